"""cembed's applications, built on the public cembed API only (``cembed.Embedding``, ``cembed.optim``,
``cembed.functional``, ``cembed.set_num_threads`` ...):

- ``cli``: ``python -m cembed train|bench|config`` (argument parsing and ``main``)
- ``train``: the skip-gram (word2vec) trainer with its cembed, torch and gensim backends
- ``corpus``: the synthetic planted-topic corpus and plain text corpora
- ``bench``: the kernel table of ``python -m cembed bench``
- ``baselines``: the idiomatic NumPy routes every benchmark compares against
"""
