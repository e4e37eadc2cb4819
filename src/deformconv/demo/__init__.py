"""The scaled-digits experiment behind ``deformconv demo``: offline digits, a small CNN, its
deformable conversion, training (one process or ``torchrun``) and the results.  Needs the
``demo`` extra (Pillow, matplotlib, tqdm)."""
