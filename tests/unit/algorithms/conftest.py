"""The tests here import their helper modules (algo_reference, algo_harness) by name; pytest runs with
--import-mode=importlib, which does not put test folders on sys.path, so this folder is added here."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
