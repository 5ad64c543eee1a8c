"""Training machinery shared by every training command: the one loop (:mod:`.loop`), pretraining
(:mod:`.pretraining`), optimizers and schedules, checkpoint I/O, monitors, feature extraction and
run folders."""
