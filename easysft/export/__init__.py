"""Exports of a trained model: a merged or re-saved HF checkpoint (:mod:`easysft.export.checkpoint`)."""
