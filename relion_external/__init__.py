"""RELION External job adapter for cryo-forum (see cryoforum_relion.py)."""
