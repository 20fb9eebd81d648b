"""Data for ul2_lm: the embedded corpus, vocabularies, seqio tasks and the input pipeline.

Only these modules import TensorFlow and seqio (corpus.py and sources.py do not): import the
submodule you need, e.g. `from ul2_lm.data import pipeline`.
"""
