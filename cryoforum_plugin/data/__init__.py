"""Embedded default data (MIT-licensed maps; licenses beside them).

- ``5j0n_asym_64px.mrc``: asymmetric protein map used by Banjac et al., Fourier-cropped to 64³ at 4.354 Å.
- ``betagal_D2_64px.mrc``: E. coli β-galactosidase (D2), from the NGL viewer examples, 64³ at 5.531 Å.
"""

from pathlib import Path

DATA_DIR = Path(__file__).parent
DEFAULT_MAP = DATA_DIR / "5j0n_asym_64px.mrc"
BETAGAL_MAP = DATA_DIR / "betagal_D2_64px.mrc"
