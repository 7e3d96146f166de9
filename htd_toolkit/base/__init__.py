"""The shipped H&E base and HTD model (`shipped.py`), and `htd-toolkit pretrain-base`, which trains such a
base from scratch on slides (`pretrain.py`)."""
