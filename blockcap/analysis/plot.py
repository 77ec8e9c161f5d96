"""A one-page PNG overview of a site: is it healthy, what does it look like, what does it encode?

Four panels: the mean vector norm per position and the per-channel mean +- std (both from the
statistics the store keeps, so they cover every token), a histogram of values and a 2-D PCA of
vectors coloured by the token they end on (both from a random sample of windows; reading cost
grows with the windows sampled, about ``sample / positions``). Needs matplotlib (the ``plot``
extra); it draws with the Agg backend and never touches pyplot's global state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockcap.analysis.reader import CaptureStore, open_store
from blockcap.analysis.search import visible
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import is_vector

SIZE_INCHES, DPI = (12, 9), 100
COLOURED_TOKENS = 10  # the most frequent last tokens get a colour each; the rest are grey


@dataclass(frozen=True)
class Report:
    """What the page shows, computed apart from drawing so it can be checked."""

    title: str
    norm_mean: np.ndarray  # (positions,) from the statistics
    channel_mean: np.ndarray  # (width,)
    channel_std: np.ndarray
    window: np.ndarray  # (sample,) where each sampled vector is
    position: np.ndarray
    values: np.ndarray  # (sample, width) float32
    pca: np.ndarray  # (sample, 2): the sample projected on its two first principal components
    explained: np.ndarray  # (2,) fraction of the sample's variance each component explains
    tokens: list[str]  # (sample,) the last token of each sampled vector, as text


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projection of ``x`` on its two first principal components, and their explained variance."""
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float((s**2).sum()) or 1.0
    k = min(2, vt.shape[0])
    proj = np.zeros((x.shape[0], 2))
    proj[:, :k] = centred @ vt[:k].T
    explained = np.zeros(2)
    explained[:k] = s[:k] ** 2 / total
    return proj, explained


def _sample(
    store: CaptureStore, site: str, block: int | None, sample: int, seed: int
) -> tuple[np.ndarray, ...]:
    """``sample`` random committed (window, position) pairs (fewer if the store is smaller), their
    vectors and token ids; whole random windows are read, then positions drawn among them."""
    rng = np.random.default_rng(seed)
    committed = np.arange(store.n_windows)  # a store with statistics is complete: every window is written
    T = store.sample_len
    windows = np.sort(rng.choice(committed, min(committed.size, -(-sample // T)), replace=False))
    flat = np.sort(rng.choice(windows.size * T, min(sample, windows.size * T), replace=False))
    row, position = flat // T, flat % T
    values = store.site(site, block).np[windows][row, position]
    ids = store.tokens.np[windows][row, position]
    return windows[row], position, values.astype(np.float32), ids


def report_data(store: CaptureStore, site: str, block: int | None, sample: int, seed: int = 0) -> Report:
    """Everything the page shows for ``site`` of ``block``."""
    arr = store.site(site, block)
    if not is_vector(site):
        raise BlockcapError(f"site={site!r} holds a pattern per window, not vectors; plot a vector site")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise BlockcapError(
            f"sample={sample!r} is out of range; use an integer 2 or more (vectors to sample)"
        )
    st = store.stats(site, block)
    window, position, values, ids = _sample(store, site, block, sample, seed)
    pca, explained = _pca(values)
    tokens = [store.tokenizer.decode([int(i)]) for i in ids]
    title = f"{arr.name} of {store.location}: {store.n_windows:,} windows x {store.sample_len} positions"
    return Report(title, st.norm_mean, st.mean, st.std, window, position, values, pca, explained, tokens)


def render(report: Report, out: Path) -> None:
    """Draw ``report`` on one page and write it to ``out`` as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    norms, hist, channels, pca = fig.subplots(2, 2).ravel()
    norms.plot(
        np.arange(report.norm_mean.size), report.norm_mean, marker="." if report.norm_mean.size < 50 else None
    )
    norms.set(title="mean vector norm per position (all tokens)", xlabel="position", ylabel="mean L2 norm")
    norms.xaxis.get_major_locator().set_params(integer=True)
    hist.hist(report.values.ravel(), bins=100, log=True, color="tab:gray")
    hist.set(title=f"values of {len(report.values):,} sampled vectors", xlabel="value", ylabel="count")
    c, mean, std = np.arange(report.channel_mean.size), report.channel_mean, report.channel_std
    channels.fill_between(c, mean - std, mean + std, alpha=0.3, label="mean ± std")
    channels.plot(c, mean, lw=0.8, label="mean")
    channels.set(title="per channel (all tokens)", xlabel="channel", ylabel="value")
    channels.legend(loc="upper right")
    _draw_pca(pca, report)
    fig.suptitle(report.title)
    fig.savefig(out, format="png")


def _draw_pca(ax: Any, report: Report) -> None:
    common = [t for t, _ in Counter(report.tokens).most_common(COLOURED_TOKENS)]
    tokens = np.asarray(report.tokens, dtype=object)
    other = ~np.isin(tokens, common)
    ax.scatter(*report.pca[other].T, s=4, color="lightgrey", label="other")
    for i, t in enumerate(common):
        ax.scatter(*report.pca[tokens == t].T, s=6, color=f"C{i % 10}", label=visible(t))
    ax.set(title="PCA of the sample, by last token", xlabel=f"PC1 ({report.explained[0]:.0%} of variance)",
           ylabel=f"PC2 ({report.explained[1]:.0%})")  # fmt: skip
    ax.legend(loc="best", fontsize="small", markerscale=2, ncols=2)


def plot(
    store: Any, site: str = "ffwd_output", block: int | None = None, out: str = "report.png",
    sample: int = 2000, seed: int = 0, storage_options: str | None = None,
) -> Path:  # fmt: skip
    """Write a one-page PNG overview of a site (norms, values, channels, a PCA by token); returns its path.

    ``store`` is a ``CaptureStore`` or a path or URL (opened with ``storage_options``).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BlockcapError("plot needs matplotlib; install it with pip install 'blockcap[plot]'") from None
    path = Path(str(out))
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise BlockcapError(
            f"out={str(out)!r} is not a .png file in an existing directory; use e.g. out=report.png"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BlockcapError(f"seed={seed!r} is not an integer 0 or more")
    s = store if isinstance(store, CaptureStore) else open_store(str(store), storage_options)
    render(report_data(s, site, block, sample, seed), path)
    return path
