"""Trained runs: building a run's parts from its config (:mod:`.build`), its checkpoints and
export (:mod:`.checkpoint`), and loading a trained run back (:mod:`.load`). Below training,
evaluation, analysis and classification, which all start from here."""
