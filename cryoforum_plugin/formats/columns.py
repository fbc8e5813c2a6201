"""Names of the per-particle columns cryo-forum adds to a STAR file."""

STAR_COLUMNS = {"max": "rlnCryoforumMaxDispersion", "trace": "rlnCryoforumTraceDispersion"}
FOM_COLUMN = "rlnParticleFigureOfMerit"
