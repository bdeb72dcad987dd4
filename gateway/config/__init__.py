"""The settings: what they are (`settings`) and how YAML and the environment become them (`load`).

Pure: no I/O beyond reading the environment mapping it is given.
"""
