"""Generated contract of loadagg.v1 (see protos/; regenerate with scripts/gen_protos.py)."""
