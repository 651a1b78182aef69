"""score-tscale: T scales of whole-score vs self-score feature differences (Teng et al., Score-DD)."""
