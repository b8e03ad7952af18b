"""Make the sibling helper modules (kernels_oracle, kernels_triton_check) importable under
`--import-mode=importlib`, which does not put test directories on sys.path."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
