"""cryo-forum: amortized orientation estimation with uncertainty, as a RELION / cryoSPARC plugin."""

__version__ = "0.1.0"
