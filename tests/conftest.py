import sys
from pathlib import Path

# tests/ holds helper modules (e.g. the brute-force reference) imported by name.
sys.path.insert(0, str(Path(__file__).parent))
