"""A deployed site's own audit folder, built from its own data: ``echoflow audit index --site DIR``.

In a federated audit each site answers from `echoflow.audit.federated.SiteAuditor` files in its own folder
(node config ``audit-site-dir``). This builds them at the site, from the site's videos and the released global
VAE + re-id weights: the index of its TRAIN frames and the embeddings of its held-out (VAL + TEST) frames. No
real frame or embedding leaves the site to build it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from echoflow.audit.federated import SiteAuditor
from echoflow.audit.index import build_index
from echoflow.audit.run import AuditSettings, embed_sites
from echoflow.data.sites import load_site
from echoflow.errors import EchoFlowError
from echoflow.models.vae import AdversarialVAE


def build_site_index(vae: AdversarialVAE, reid: nn.Module, site_dir: Path, out: Path, *, size: int,
                     settings: AuditSettings) -> SiteAuditor:
    """Embed and index one site folder (EchoNet layout) into ``out`` (``index.faiss`` + ``heldout.npy``).

    Args:
        vae: the global VAE (eval mode).
        reid: the global re-id encoder (eval mode).
        site_dir: the site's data folder.
        out: its audit folder (created; its name is the site's name in the audit, as `SiteAuditor.load` reads it).
        size: frame side the videos are decoded at (``data.size``).
        settings: the ``audit`` group (``every``, ``real_frames``, ``index``, ``similarity``, ``seed``).

    Raises:
        EchoFlowError: the folder has no TRAIN or no held-out (VAL/TEST) videos.
    """
    train = load_site(site_dir, size=size, splits=["TRAIN"])
    heldout = load_site(site_dir, size=size, splits=["VAL", "TEST"])
    if not train.videos or not heldout.videos:
        raise EchoFlowError(f"{site_dir}: needs TRAIN and VAL/TEST videos to build its audit index")
    real = embed_sites(vae, reid, [train], [heldout], settings)[train.name]
    index = build_index(real.train.vectors, kind=settings.index, similarity=settings.similarity, seed=settings.seed)
    auditor = SiteAuditor(out.name, index, real.heldout)
    out.mkdir(parents=True, exist_ok=True)
    auditor.save(out)
    return auditor

