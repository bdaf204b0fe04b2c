"""SMAP in the zoo (arXiv 2007.15591): a joint t-SNE of lesion embeddings held by several hospitals, computed on
secret shares. The sites' embeddings (:mod:`ctzoo.smap.features`) and their files (:mod:`ctzoo.smap.site_file`), the
plaintext t-SNE every secure result is checked against (:mod:`ctzoo.smap.tsne`), the secure P and gradient descent
(:mod:`ctzoo.smap.secure`), the parties' TLS keys (:mod:`ctzoo.smap.keys`), one party's run
(:mod:`ctzoo.smap.party`) and its page (:mod:`ctzoo.smap.page`)."""
