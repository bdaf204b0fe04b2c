"""SMAP in the zoo (arXiv 2007.15591): a joint t-SNE of lesion embeddings held by several hospitals. Built so far:
the sites' embedding files (:mod:`ctzoo.smap.features`) and the plaintext t-SNE every secure result is checked
against (:mod:`ctzoo.smap.tsne`); the secure multi-party protocol is not built yet (issue 27)."""
