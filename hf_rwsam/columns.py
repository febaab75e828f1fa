"""Dataset columns the package adds to a batch and takes out again before the model sees it."""

NOISE_COLUMN = "is_noisy"
"""Optional column marking samples whose training label was corrupted; used for RW-SAM's diagnostics only."""

CLEAN_LABEL_COLUMN = "clean_label"
"""The uncorrupted label, kept beside the (possibly corrupted) training label by `add_label_noise`."""

INDEX_COLUMN = "example_index"
"""An example's position in the training set, carried through shuffling and collation to the training step for the
label-issue report (`hf_rwsam.data.ExampleIndexed`, `RWSAMConfig.report_label_issues`); never given to the model."""
