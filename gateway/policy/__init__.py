"""What a request may do, decided from the settings and the request alone.

Routing, the credential to send, the headers, what the API issued to whom
(links), what is redacted, and which way the upstream is reached. Pure: no
I/O, no framework; the edge asks, these answer.
"""
