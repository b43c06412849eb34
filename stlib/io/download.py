"""Downloads: HEST-1k samples by id (Hugging Face or a local mirror), plain HTTP files, PanNuke,
and the real annotated H&E sets MoNuSeg and CoNSeP (:func:`download_monuseg`, :func:`download_consep`;
:func:`download_annotated_sets` fetches every set the manifest lists, from the network or a mirror).

Three entry points, all resumable and idempotent (a finished file is never fetched twice):

- :func:`download_hest` fetches the files of chosen HEST-1k samples from the gated
  ``MahmoodLab/hest`` dataset with :func:`huggingface_hub.snapshot_download`, or copies them
  from a local mirror in the HEST layout (air-gapped sites, tests).
- :func:`download_file` streams one URL to ``dest.part``, resumes with an HTTP ``Range``
  request, checks the SHA-256 and renames onto ``dest`` only when complete and verified.
- :func:`download_pannuke` fetches the PanNuke fold archives and unpacks them into the
  ``Fold k/...`` layout.

The Hugging Face token is never a parameter: ``huggingface_hub`` finds it in ``HF_TOKEN`` or
its own cache (``hf auth login``). This module never prints or logs it, and every error message
that passes through here is scrubbed of it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stlib.utils import InputError, StlibError, atomic_dir, atomic_path, format_error

__all__ = [
    "ANNOTATED_SETS",
    "DownloadError",
    "HEST_KINDS",
    "HEST_REPO_ID",
    "HEST_TABLE",
    "PANNUKE_DEFAULT_URLS",
    "annotated_mirror",
    "cli_main",
    "download_annotated",
    "download_annotated_sets",
    "download_consep",
    "download_file",
    "download_hest",
    "download_monuseg",
    "download_pannuke",
    "hest_allow_patterns",
    "hest_missing_files",
    "pannuke_sources",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: The HEST-1k dataset on the Hugging Face Hub (gated: accept its terms first).
HEST_REPO_ID = "MahmoodLab/hest"
#: The HEST-1k metadata table at the root of the dataset.
HEST_TABLE = "HEST_v1_1_0.csv"
#: File kind -> path template (relative to the HEST root) of one sample's file.
HEST_KINDS: dict[str, str] = {
    "wsis": "wsis/{id}.tif",
    "metadata": "metadata/{id}.json",
    "transcripts": "transcripts/{id}_transcripts.parquet",
    "xenium_seg": "xenium_seg/{id}_xenium_nucleus_seg.parquet",
    "cellvit_seg": "cellvit_seg/{id}_cellvit_seg.parquet",
}
DEFAULT_KINDS: tuple[str, ...] = tuple(HEST_KINDS)

#: PanNuke fold archives as the TIA centre (Warwick) publishes them; used when the data
#: manifest has no ``pannuke`` block. No checksums are published with them.
PANNUKE_DEFAULT_URLS: dict[int, str] = {
    k: f"https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_{k}.zip" for k in (1, 2, 3)
}

#: Seconds to wait before the first retry of an interrupted HTTP transfer (doubles each time).
RETRY_BACKOFF_S = 1.0

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_GATED_FIX = (
    "accept the HEST-1k terms on its Hugging Face page (https://huggingface.co/datasets/MahmoodLab/hest) "
    "and set HF_TOKEN or run `hf auth login` (older clients: `huggingface-cli login`)"
)


class DownloadError(StlibError):
    """A download failed: unreachable server, refused access, or corrupted/incomplete data.

    Parameters
    ----------
    message
        What went wrong.
    url
        The URL or repository involved (named in the message).
    path
        The local file involved (named in the message).
    sample
        The sample id, when known.
    fix
        What the user should do about it.
    """

    def __init__(self, message: str, *, url: str | None = None, path: str | os.PathLike | None = None,
                 sample: str | None = None, fix: str | None = None) -> None:
        self.url = url
        self.path = None if path is None else Path(path)
        self.sample = sample
        self.fix = fix
        super().__init__(_scrub(format_error(message, path=path, sample=sample, fix=fix, url=url or None)))


# --------------------------------------------------------------------------------------------
# secrets hygiene
# --------------------------------------------------------------------------------------------

def _known_tokens() -> list[str]:
    """Token strings that must never appear in a message: the environment's and the saved login.

    Reads the login file directly (no ``get_token()``: that may refresh or exchange tokens over
    the network).
    """
    found = [os.environ.get(var, "").strip() for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants

        token_file = Path(constants.HF_TOKEN_PATH)
        if token_file.is_file():
            found.append(token_file.read_text().strip())
    except Exception:  # noqa: BLE001 - redaction must never fail
        pass
    return [t for t in found if len(t) >= 4]


def _scrub(text: str) -> str:
    """Replace any known token (and any ``Bearer ...`` credential) in ``text`` by ``***``."""
    for tok in _known_tokens():
        text = text.replace(tok, "***")
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


# --------------------------------------------------------------------------------------------
# HEST-1k
# --------------------------------------------------------------------------------------------

def _check_ids(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, str):
        ids = [ids]
    out = []
    for i in ids:
        i = str(i).strip()
        if not _ID_RE.match(i):
            raise InputError(f"{i!r} is not a HEST-1k sample id (letters, digits, '_', '-', '.')",
                             fix="pass ids such as TENX95 as listed in HEST_v1_1_0.csv")
        if i not in out:
            out.append(i)
    if not out:
        raise InputError("no HEST-1k sample id given", fix="pass at least one id, e.g. --ids TENX95")
    return out


def _check_kinds(kinds: Iterable[str]) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in HEST_KINDS]
    if bad:
        raise InputError(f"unknown HEST file kind(s) {bad}", fix=f"choose from {list(HEST_KINDS)}")
    if not kinds:
        raise InputError("no HEST file kind selected", fix=f"choose from {list(HEST_KINDS)}")
    return kinds


def _hest_files(ids: Iterable[str], kinds: Iterable[str]) -> dict[str, list[str]]:
    """Sample id -> the relative paths of its requested files."""
    kinds = _check_kinds(kinds)
    return {i: [HEST_KINDS[k].format(id=i) for k in kinds] for i in _check_ids(ids)}


def hest_allow_patterns(ids: Iterable[str], *, kinds: Iterable[str] = DEFAULT_KINDS) -> list[str]:
    """The ``allow_patterns`` that select exactly the files of ``ids`` in the HEST-1k dataset.

    Parameters
    ----------
    ids
        HEST-1k sample ids (e.g. ``["TENX95", "NCBI783"]``).
    kinds
        Which files per sample, any of ``wsis``, ``metadata``, ``transcripts``, ``xenium_seg``,
        ``cellvit_seg`` (see :data:`HEST_KINDS`).

    Returns
    -------
    list[str]
        The metadata table ``HEST_v1_1_0.csv`` followed by one literal path per sample and kind
        (no wildcards, so ``TENX95`` never selects ``TENX950``).
    """
    files = _hest_files(ids, kinds)
    return [HEST_TABLE] + [f for per_id in files.values() for f in per_id]


def hest_missing_files(ids: Iterable[str], root: str | os.PathLike, *,
                       kinds: Iterable[str] = DEFAULT_KINDS) -> dict[str, list[str]]:
    """Which requested files are absent (or empty) under a HEST-layout folder.

    Parameters
    ----------
    ids
        HEST-1k sample ids.
    root
        A folder in the HEST layout (``wsis/``, ``metadata/``, ...).
    kinds
        File kinds per sample, as in :func:`hest_allow_patterns`.

    Returns
    -------
    dict[str, list[str]]
        Sample id -> missing relative paths, only for samples that miss something; the key
        ``"HEST_v1_1_0.csv"`` appears when the metadata table is missing.
    """
    root = Path(root)
    missing: dict[str, list[str]] = {}
    if not _is_nonempty_file(root / HEST_TABLE):
        missing[HEST_TABLE] = [HEST_TABLE]
    for i, files in _hest_files(ids, kinds).items():
        gone = [f for f in files if not _is_nonempty_file(root / f)]
        if gone:
            missing[i] = gone
    return missing


def _is_nonempty_file(p: Path) -> bool:
    try:
        return p.is_file() and p.stat().st_size > 0
    except OSError:
        return False


def _format_missing(missing: Mapping[str, list[str]]) -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items())


def _offline_requested(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _offline_sentence(ids: Sequence[str], out_dir: Path, why: str) -> str:
    return (f"HEST-1k sample(s) {', '.join(ids)} are not all in {out_dir} and {why}, so run again with "
            f"network access, or copy a HEST-1k mirror to a folder DIR and pass --mirror DIR "
            f"(download_hest(..., mirror=DIR)) or point data_dir at it.")


def _is_connection_error(e: BaseException) -> bool:
    """True for 'no network' failures (refused, DNS, timeout, offline mode), any HTTP library."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"TransportError", "ConnectError", "ConnectTimeout", "TimeoutException",
                    "NetworkError", "OfflineModeIsEnabled", "NewConnectionError", "MaxRetryError",
                    "NameResolutionError", "ConnectionError", "Timeout", "ReadTimeout",
                    "ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "ProtocolError"}:
            return True
        e = e.__cause__ or e.__context__
    return False


def _hf_error(e: BaseException, *, repo_id: str, ids: Sequence[str], out_dir: Path,
              revision: str | None) -> DownloadError:
    """Turn a huggingface_hub exception into one DownloadError (scrubbed of any token)."""
    from huggingface_hub import errors as hf_errors

    status = None
    resp = getattr(e, "response", None)
    if resp is not None:
        status = getattr(resp, "status_code", None)
    what = f"dataset {repo_id}"
    samples = ", ".join(ids)
    if isinstance(e, hf_errors.GatedRepoError) or status in (401, 403):
        return DownloadError(f"access refused (HTTP {status or 'gated'}) while fetching HEST-1k sample(s) {samples}",
                             url=what, fix=_GATED_FIX)
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found", url=what,
                             fix="pass an existing branch, tag or commit of the dataset (or none for main)")
    if isinstance(e, hf_errors.RepositoryNotFoundError) or status == 404:
        return DownloadError("repository not found on the Hub", url=what,
                             fix=f"check repo_id (the HEST-1k dataset is {HEST_REPO_ID}); {_GATED_FIX}")
    if _is_connection_error(e):
        return DownloadError(_offline_sentence(ids, out_dir, f"the Hugging Face Hub cannot be reached "
                                                             f"({type(e).__name__})"))
    if status is not None and int(status) >= 500:
        return DownloadError(f"the Hugging Face Hub answered HTTP {status}", url=what,
                             fix="try again later; finished files are kept and not fetched again")
    return DownloadError(f"download of HEST-1k sample(s) {samples} failed: {type(e).__name__}: {e}", url=what,
                         fix="re-run to resume; if it persists, check the dataset page and your HF_TOKEN")


def _copy_from_mirror(mirror: Path, out_dir: Path, rel_paths: Iterable[str]) -> int:
    """Hard-link (or copy) ``rel_paths`` from ``mirror`` to ``out_dir`` atomically; skip done ones."""
    n = 0
    for rel in rel_paths:
        src, dst = mirror / rel, out_dir / rel
        if not _is_nonempty_file(src):
            continue
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        n += 1
    return n


def download_hest(ids: Iterable[str], out_dir: str | os.PathLike, *, repo_id: str = HEST_REPO_ID,
                  revision: str | None = None, kinds: Iterable[str] = DEFAULT_KINDS,
                  offline: bool | None = None, mirror: str | os.PathLike | None = None,
                  allow_missing: bool = False, force: bool = False,
                  endpoint: str | None = None) -> Path:
    """Fetch the files of HEST-1k samples into a folder in the HEST layout.

    Files already present are not fetched again. The Hugging Face token comes only from
    ``HF_TOKEN`` or huggingface_hub's own cache (``hf auth login``); it is never printed.

    Parameters
    ----------
    ids
        HEST-1k sample ids, e.g. ``["TENX95"]``.
    out_dir
        Destination HEST root (``{data_dir}/hest``); gets ``wsis/{id}.tif`` etc. and
        ``HEST_v1_1_0.csv``.
    repo_id
        The dataset on the Hub.
    revision
        Branch, tag or commit of the dataset (default: main).
    kinds
        File kinds per sample (see :data:`HEST_KINDS`).
    offline
        Never touch the network. ``None``: offline when ``HF_HUB_OFFLINE=1``.
    mirror
        A local folder in the HEST layout to copy (hard-link when possible) the files from
        instead of the Hub.
    allow_missing
        Log the files the source lacks instead of raising (some samples have no Xenium
        transcripts, for instance).
    force
        Ask the Hub again even when all files are present.
    endpoint
        Hub URL (default: huggingface_hub's, i.e. ``HF_ENDPOINT`` or huggingface.co).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    DownloadError
        Access refused (gated dataset: accept its terms), no network / offline mode, or
        files missing at the source (listed per sample).
    InputError
        Bad ids, kinds or mirror folder.
    """
    ids = _check_ids(ids)
    kinds = _check_kinds(kinds)
    out_dir = Path(out_dir)
    patterns = hest_allow_patterns(ids, kinds=kinds)

    if mirror is not None:
        mirror = Path(mirror)
        if not mirror.is_dir():
            raise InputError("HEST mirror folder not found", path=mirror,
                             fix="pass a folder in the HEST layout (wsis/, metadata/, transcripts/, ...)")
        out_dir.mkdir(parents=True, exist_ok=True)
        n = _copy_from_mirror(mirror, out_dir, patterns)
        logger.info("HEST mirror %s: %d file(s) placed in %s", mirror, n, out_dir)
        missing = hest_missing_files(ids, out_dir, kinds=kinds)
        if missing:
            msg = f"the mirror lacks file(s) ({_format_missing(missing)})"
            if not allow_missing:
                raise DownloadError(msg, path=mirror,
                                    fix="complete the mirror, drop those --kinds, or pass --allow-missing")
            logger.warning("%s: %s", mirror, msg)
        return out_dir

    if not force and not hest_missing_files(ids, out_dir, kinds=kinds):
        logger.info("HEST sample(s) %s already complete in %s", ", ".join(ids), out_dir)
        return out_dir
    if _offline_requested(offline):
        raise DownloadError(_offline_sentence(ids, out_dir, "offline mode is on (HF_HUB_OFFLINE=1)"))

    from huggingface_hub import HfApi, snapshot_download

    try:
        # Resolve the commit ourselves: a refused or unreachable Hub then fails here, instead of
        # snapshot_download silently returning a partly filled out_dir.
        info = HfApi(endpoint=endpoint).repo_info(repo_id=repo_id, repo_type="dataset", revision=revision)
        out_dir.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo_id=repo_id, repo_type="dataset", revision=info.sha or revision,
                          allow_patterns=patterns, local_dir=out_dir, endpoint=endpoint,
                          tqdm_class=_hf_tqdm_class())
    except StlibError:
        raise
    except Exception as e:  # noqa: BLE001 - classified into one clear message below
        raise _hf_error(e, repo_id=repo_id, ids=ids, out_dir=out_dir, revision=revision) from None

    missing = hest_missing_files(ids, out_dir, kinds=kinds)
    if missing:
        msg = f"dataset {repo_id} has no file(s) {_format_missing(missing)}"
        if not allow_missing:
            raise DownloadError(msg, path=out_dir,
                                fix="check the ids in HEST_v1_1_0.csv (st_technology, organ), drop those "
                                    "--kinds, or pass --allow-missing")
        logger.warning("%s", msg)
    return out_dir


def _no_progress() -> bool:
    return os.environ.get("STLIB_NO_PROGRESS", "0") == "1"


def _hf_tqdm_class() -> Any:
    """None (huggingface_hub's own bars) or a disabled tqdm subclass when STLIB_NO_PROGRESS=1."""
    if not _no_progress():
        return None
    from tqdm.std import tqdm

    class _Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


# --------------------------------------------------------------------------------------------
# plain HTTP files
# --------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


class _Retry(Exception):
    """Internal: the transfer broke off; the .part is kept for a Range resume."""


def _progress_bar(desc: str, total: int | None, initial: int):
    from tqdm.std import tqdm

    return tqdm(desc=desc, total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                disable=_no_progress(), mininterval=1.0)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a ``Content-Range: bytes a-b/total`` header (None when absent/unknown)."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transfer_once(session: Any, url: str, part: Path, *, chunk_size: int, timeout: float,
                   expected_size: int | None, desc: str) -> None:
    """One HTTP request that appends to (206) or rewrites (200) ``part``; raise _Retry on a break."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return
    headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, stream=True, timeout=timeout, headers=headers)
    except requests.exceptions.RequestException as e:
        if _is_connection_error(e):
            raise _Retry(f"cannot connect ({type(e).__name__})") from e
        raise DownloadError(f"request failed: {type(e).__name__}: {e}", url=url,
                            fix="check the URL and your network") from e
    with resp:
        if resp.status_code == 416 and offset:
            _, total = _content_range(resp.headers.get("Content-Range"))
            if total is not None and total == offset:
                return  # the .part is already complete
            part.unlink(missing_ok=True)
            raise _Retry("server refused the resume range; restarting")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retry(f"server answered HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"server answered HTTP {resp.status_code}", url=url,
                                fix="check the URL (and any access rights it needs)")
        if resp.status_code == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:  # 200: whole file (a server that ignores Range restarts from zero)
            if offset:
                logger.info("%s: server ignored the Range request; restarting from byte 0", url)
            offset, mode, total = 0, "wb", None
        length = resp.headers.get("Content-Length")
        if total is None and length is not None and length.isdigit():
            total = offset + int(length)
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"server announces {total} bytes, expected {expected_size}", url=url,
                                fix="check the URL or the expected size in the data manifest")
        bar = _progress_bar(desc, total, offset)
        try:
            with open(part, mode) as f:
                for block in resp.iter_content(chunk_size=chunk_size):
                    if block:
                        f.write(block)
                        bar.update(len(block))
        except requests.exceptions.RequestException as e:  # the network broke off
            raise _Retry(f"transfer interrupted at byte {part.stat().st_size} ({type(e).__name__})") from e
        except OSError as e:  # the local disk
            raise DownloadError(f"cannot write the download: {e}", url=url, path=part,
                                fix="check free disk space and write permission") from e
        finally:
            bar.close()
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Retry(f"transfer ended early at byte {size} of {total}")


def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
                  expected_size: int | None = None, chunk_size: int = 1 << 20, timeout: float = 60,
                  retries: int = 3, force: bool = False) -> Path:
    """Download one URL to ``dest``, resumably and verified.

    The bytes go to the sidecar ``dest.part``; an interrupted transfer is resumed from it with an
    HTTP ``Range`` request (a server that ignores ``Range`` and answers 200 restarts the file).
    Only a complete file whose SHA-256 (when given) matches is renamed onto ``dest``.

    Parameters
    ----------
    url
        HTTP(S) URL.
    dest
        Final file path.
    sha256
        Expected hex SHA-256. An existing ``dest`` that matches is kept (nothing is fetched);
        one that does not is downloaded again. A download that does not match is deleted.
    expected_size
        Expected size in bytes (checked when given).
    chunk_size
        Bytes per read.
    timeout
        Seconds to wait for the server (connect and each read).
    retries
        Extra attempts after an interrupted transfer, each resuming from ``dest.part``.
    force
        Download even when ``dest`` exists and matches.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DownloadError
        The server refused the file, the transfer kept breaking off, or the data do not match
        ``sha256`` / ``expected_size`` (the message names url, file and both hashes).
    """
    import requests

    dest = Path(dest)
    if sha256 is not None:
        if not _HEX64_RE.match(sha256.strip()):
            raise InputError(f"sha256 {sha256!r} is not 64 hex digits", path=dest,
                             fix="pass the SHA-256 as printed by `sha256sum`")
        sha256 = sha256.strip().lower()
    if dest.is_dir():
        raise InputError("destination is a folder", path=dest, fix="pass a file path, e.g. DIR/name.zip")

    if dest.is_file() and not force:
        if sha256 is not None:
            actual = sha256_file(dest, chunk_size=chunk_size)
            if actual == sha256:
                logger.info("%s: present and verified, not downloaded again", dest)
                return dest
            logger.warning("%s: present but SHA-256 %s != expected %s; downloading again", dest, actual, sha256)
        elif expected_size is None or dest.stat().st_size == expected_size:
            logger.info("%s: present, not downloaded again", dest)
            return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    last: str = "no attempt made"
    with requests.Session() as session:
        for attempt in range(int(retries) + 1):
            if attempt:
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 30.0))
            try:
                _transfer_once(session, url, part, chunk_size=chunk_size, timeout=timeout,
                               expected_size=expected_size, desc=dest.name)
                break
            except _Retry as r:
                last = str(r)
                logger.warning("%s: %s (attempt %d of %d)", url, last, attempt + 1, int(retries) + 1)
        else:
            raise DownloadError(f"download did not complete after {int(retries) + 1} attempt(s): {last}",
                                url=url, path=dest,
                                fix=f"check the network and run again: it resumes from {part.name}")

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"downloaded {size} bytes, expected {expected_size}; the corrupted download was "
                            f"deleted", url=url, path=dest, fix="check the URL or the expected size, then run again")
    if sha256 is not None:
        actual = sha256_file(part, chunk_size=chunk_size)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"SHA-256 mismatch: expected {sha256}, got {actual}; the corrupted download "
                                f"was deleted", url=url, path=dest,
                                fix="run again; if it persists the file at the URL changed: check the "
                                    "checksum in data_manifest.yaml")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# PanNuke
# --------------------------------------------------------------------------------------------

def _manifest_pannuke_block(manifest: Any) -> Any:
    if manifest is None:
        return None
    if isinstance(manifest, (str, os.PathLike)):
        import yaml

        p = Path(manifest)
        if not p.is_file():
            raise InputError("data manifest not found", path=p, fix="pass an existing data_manifest.yaml")
        manifest = yaml.safe_load(p.read_text()) or {}
    if isinstance(manifest, Mapping):
        return manifest.get("pannuke")
    return getattr(manifest, "pannuke", None)


def _fold_entries(block: Any) -> dict[int, dict[str, Any]]:
    """Normalise a manifest ``pannuke`` block to {fold: {"url":..., "sha256":..., "size":...}}."""
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        block = {"folds": block}
    folds = block.get("folds", block)
    out: dict[int, dict[str, Any]] = {}
    items: Iterable[tuple[Any, Any]]
    if isinstance(folds, Mapping):
        items = folds.items()
    else:
        items = ((e.get("fold") if isinstance(e, Mapping) else getattr(e, "fold", None), e) for e in folds)
    for key, entry in items:
        if isinstance(entry, str):
            entry = {"url": entry}
        elif not isinstance(entry, Mapping):
            entry = {k: getattr(entry, k, None) for k in ("url", "sha256", "size")}
        m = re.search(r"\d+", str(key))
        if m is None or not entry.get("url"):
            continue
        out[int(m.group())] = {"url": entry.get("url"), "sha256": entry.get("sha256"),
                               "size": entry.get("size") or entry.get("expected_size")}
    return out


def pannuke_sources(folds: Iterable[int] = (1, 2, 3), *, manifest: Any = None) -> dict[int, dict[str, Any]]:
    """URL, SHA-256 and size of each PanNuke fold archive.

    Parameters
    ----------
    folds
        Fold numbers (1, 2, 3).
    manifest
        A loaded manifest (mapping or object with a ``pannuke`` attribute) or a path to a
        ``data_manifest.yaml``. ``None``: ``stlib.io.manifest.load_manifest()`` when available,
        else the built-in defaults :data:`PANNUKE_DEFAULT_URLS` (no checksums).

    Returns
    -------
    dict[int, dict]
        Fold -> ``{"url": str, "sha256": str | None, "size": int | None}``.
    """
    folds = [int(k) for k in folds]
    bad = [k for k in folds if k not in PANNUKE_DEFAULT_URLS]
    if bad or not folds:
        raise InputError(f"PanNuke has folds 1, 2 and 3, not {bad or folds}", fix="pass --folds among 1 2 3")
    if manifest is None:
        try:
            from stlib.io.manifest import load_manifest  # written by another stage; optional here

            manifest = load_manifest()
        except (ImportError, FileNotFoundError, InputError) as e:
            logger.info("no data manifest (%s); using the built-in PanNuke URLs", type(e).__name__)
            manifest = None
    entries = _fold_entries(_manifest_pannuke_block(manifest))
    return {k: entries.get(k, {"url": PANNUKE_DEFAULT_URLS[k], "sha256": None, "size": None}) for k in folds}


def _pannuke_complete(fold_dir: Path, k: int) -> bool:
    return all(_is_nonempty_file(fold_dir / sub / f"fold{k}" / name)
               for sub, name in (("images", "images.npy"), ("images", "types.npy"), ("masks", "masks.npy")))


def _extract_fold(zip_path: Path, fold_dir: Path, k: int) -> None:
    """Unpack one fold archive into ``fold_dir`` (= ``out/Fold k``) atomically."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DownloadError("not a valid zip archive; it was deleted", path=zip_path,
                            fix="run again to download it anew") from e
    with zf, tempfile.TemporaryDirectory(prefix=".unzip.", dir=fold_dir.parent) as staging:
        staging_p = Path(staging).resolve()
        for info in zf.infolist():
            target = (staging_p / info.filename).resolve()
            if staging_p != target and staging_p not in target.parents:
                raise DownloadError(f"archive member {info.filename!r} points outside the folder", path=zip_path,
                                    fix="delete the archive; it is not a PanNuke fold")
        zf.extractall(staging_p)
        hits = [p for p in staging_p.rglob("images.npy") if p.parent.name == f"fold{k}"
                and p.parent.parent.name == "images"]
        if not hits:
            raise DownloadError(f"archive has no images/fold{k}/images.npy", path=zip_path,
                                fix=f"check that the URL points at PanNuke fold {k}")
        root = hits[0].parent.parent.parent
        if not _pannuke_complete(root, k):
            raise DownloadError(f"archive lacks images/fold{k}/types.npy or masks/fold{k}/masks.npy",
                                path=zip_path, fix=f"check that the URL points at PanNuke fold {k}")
        with atomic_dir(fold_dir) as tmp:
            for child in root.iterdir():
                os.replace(child, tmp / child.name)


def download_pannuke(out_dir: str | os.PathLike, *, folds: Iterable[int] = (1, 2, 3), manifest: Any = None,
                     keep_archives: bool = False) -> Path:
    """Download PanNuke fold archives and unpack them as ``out_dir/Fold k/{images,masks}/fold{k}/...``.

    Parameters
    ----------
    out_dir
        The PanNuke root (``{data_dir}/pannuke``).
    folds
        Which folds (1, 2, 3).
    manifest
        Where URLs and checksums come from (see :func:`pannuke_sources`).
    keep_archives
        Keep the ``.zip`` files in ``out_dir/.archives`` after unpacking.

    Returns
    -------
    Path
        ``out_dir``. Folds already unpacked are skipped.
    """
    out_dir = Path(out_dir)
    sources = pannuke_sources(folds, manifest=manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, src in sources.items():
        fold_dir = out_dir / f"Fold {k}"
        if _pannuke_complete(fold_dir, k):
            logger.info("PanNuke fold %d already in %s", k, fold_dir)
            continue
        archive = out_dir / ".archives" / f"fold_{k}.zip"
        download_file(src["url"], archive, sha256=src.get("sha256"),
                      expected_size=int(src["size"]) if src.get("size") else None)
        try:
            _extract_fold(archive, fold_dir, k)
        except DownloadError:
            archive.unlink(missing_ok=True)  # wrong or broken content: fetch anew next time
            raise
        if not keep_archives:
            archive.unlink(missing_ok=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Real annotated H&E: MoNuSeg, CoNSeP
# --------------------------------------------------------------------------------------------

def _annotated_block(kind: str, manifest: Any) -> dict[str, Any]:
    if manifest is None:
        try:
            from stlib.io.manifest import load_manifest

            manifest = load_manifest()
        except (ImportError, FileNotFoundError, InputError):
            manifest = None
    block = None
    if isinstance(manifest, (str, os.PathLike)):
        from stlib.io.manifest import load_manifest

        manifest = load_manifest(manifest)
    if manifest is not None:
        block = (manifest.get("annotated_he") if isinstance(manifest, Mapping)
                 else getattr(manifest, "annotated_he", None)) or {}
        block = block.get(kind)
    if not block:
        from stlib.io.manifest import ANNOTATED_HE

        block = ANNOTATED_HE[kind]
    return dict(block)


#: The public annotated sets :func:`download_annotated` knows (blocks of the manifest's ``annotated_he``).
ANNOTATED_SETS: tuple[str, ...] = ("monuseg", "consep")


def _holds_set(folder: Path, name: str) -> bool:
    """Whether ``folder`` is a copy of the annotated set ``name`` in a layout its downloader takes."""
    if not folder.is_dir():
        return False
    if name == "monuseg":
        return (folder / "images").is_dir() and (folder / "annotations").is_dir()
    return ((folder / "images").is_dir() and (folder / "inst").is_dir()) or (folder / "Train").is_dir() \
        or (folder / "CoNSeP" / "Train").is_dir()


def annotated_mirror(mirror: str | os.PathLike, name: str) -> Path:
    """The folder of a local mirror that holds the annotated set ``name``.

    ``mirror`` is either the set's own copy (``images/`` + ``annotations/`` for MoNuSeg; the
    CoNSeP patch export or ``CoNSeP/Train|Test``) or a folder of sets that names them
    ``nuclei-<name>/`` (the layout of ``../shared/realdata``) or ``<name>/``.

    Raises
    ------
    InputError
        When neither ``mirror`` nor one of those sub-folders holds the set.
    """
    if name not in ANNOTATED_SETS:
        raise InputError(f"unknown annotated set {name!r}", fix=f"one of {list(ANNOTATED_SETS)}")
    root = Path(mirror)
    if not root.is_dir():
        raise InputError("mirror folder not found", path=root, fix="point --mirror at a local copy of the set")
    for cand in (root, root / f"nuclei-{name}", root / name):
        if _holds_set(cand, name):
            return cand
    # a set folder with its sub-folders present but incomplete: its downloader names what is missing
    return root


def download_annotated(name: str, out_dir: str | os.PathLike, *, mirror: str | os.PathLike | None = None,
                       manifest: Any = None) -> Path:
    """One public annotated set of the manifest's ``annotated_he`` block into ``out_dir``.

    Parameters
    ----------
    name
        ``monuseg`` or ``consep`` (:data:`ANNOTATED_SETS`).
    out_dir
        Folder to fill, conventionally ``{data_dir}/annotations/<name>``: the evaluation
        chapters read every set found there as manual truth.
    mirror
        A local copy to take the files from instead of the network: the set's own folder or a
        folder of sets (:func:`annotated_mirror`, e.g. ``../shared/realdata``).
    manifest
        Where file names, URLs and checksums come from (default: ``data_manifest.yaml``).

    Returns
    -------
    Path
        ``out_dir``.
    """
    if name not in ANNOTATED_SETS:
        raise InputError(f"unknown annotated set {name!r}", fix=f"one of {list(ANNOTATED_SETS)}")
    src = annotated_mirror(mirror, name) if mirror is not None else None
    if name == "monuseg":
        return download_monuseg(out_dir, mirror=src, manifest=manifest)
    return download_consep(out_dir, mirror=src, manifest=manifest)


def download_annotated_sets(out_root: str | os.PathLike, *, names: Iterable[str] | None = None,
                            mirror: str | os.PathLike | None = None, manifest: Any = None) -> dict[str, Path]:
    """Every annotated set the manifest lists (or ``names``) into ``out_root/<name>``.

    The paper profile's notebook 00 calls this with ``out_root = {data_dir}/annotations``, so
    the public manual annotations are the default manual truth of the evaluation chapters.
    ``mirror`` as in :func:`download_annotated`. Finished files are not fetched again.
    """
    if names is None:
        block = _annotated_block_all(manifest)
        names = [n for n in block if n in ANNOTATED_SETS]
    out = Path(out_root)
    return {n: download_annotated(n, out / n, mirror=mirror, manifest=manifest) for n in names}


def _annotated_block_all(manifest: Any) -> dict[str, Any]:
    """The manifest's ``annotated_he`` block (every set), or stlib's copy of it."""
    if manifest is None or isinstance(manifest, (str, os.PathLike)):
        try:
            from stlib.io.manifest import load_manifest

            manifest = load_manifest(manifest)
        except (FileNotFoundError, InputError):
            manifest = None
    block = None
    if manifest is not None:
        block = (manifest.get("annotated_he") if isinstance(manifest, Mapping)
                 else getattr(manifest, "annotated_he", None))
    if not block:
        from stlib.io.manifest import ANNOTATED_HE

        block = ANNOTATED_HE
    return dict(block)


def _copy_verified(src: Path, dest: Path, *, sha256: str | None, size: int | None) -> None:
    """Copy one file atomically, checking size and SHA-256 when known (a mismatch loses nothing)."""
    if not src.is_file():
        raise InputError("file missing in the mirror", path=src, fix="point --mirror at a complete copy")
    if size is not None and src.stat().st_size != int(size):
        raise DownloadError(f"size {src.stat().st_size} differs from the manifest's {size}", path=src,
                            fix="the mirror holds another version of this file; use an unmodified copy")
    if sha256 and sha256_file(src).lower() != str(sha256).lower():
        raise DownloadError("SHA-256 differs from the manifest", path=src,
                            fix="the mirror holds another version of this file; use an unmodified copy")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _verified(dest: Path, sha256: str | None, size: int | None) -> bool:
    if not _is_nonempty_file(dest):
        return False
    if size is not None and dest.stat().st_size != int(size):
        return False
    return not sha256 or sha256_file(dest).lower() == str(sha256).lower()


def download_monuseg(out_dir: str | os.PathLike, *, mirror: str | os.PathLike | None = None,
                     names: Iterable[str] | None = None, manifest: Any = None) -> Path:
    """The MoNuSeg images and XML outlines of the manifest, as ``out_dir/{images,annotations}/``.

    Parameters
    ----------
    out_dir
        Folder to fill (the layout :func:`stlib.io.annotations.read_monuseg_folder` reads).
    mirror
        A local copy in the same layout (``images/NAME.tif``, ``annotations/NAME.xml``), e.g.
        ``../shared/realdata/nuclei-monuseg``: files are copied from it instead of downloaded.
    names
        Image names to fetch (default: every image of the manifest).
    manifest
        Where file names, URLs and checksums come from (default: ``data_manifest.yaml``).

    Every file is checked against the manifest's size and SHA-256; finished files are skipped.
    """
    block = _annotated_block("monuseg", manifest)
    files = {f["name"]: f for f in block.get("files", [])}
    want = list(names) if names is not None else list(files)
    unknown = sorted(set(want) - set(files))
    if unknown:
        raise InputError(f"image(s) {unknown} are not in the manifest's MoNuSeg list",
                         fix=f"choose among {sorted(files)}")
    out = Path(out_dir)
    for sub in ("images", "annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    tmpl = block.get("url_template", "")
    folders = block.get("folders", {"image": "Tissue%20Images", "xml": "Annotations"})
    for name in want:
        f = files[name]
        for kind, sub, ext in (("image", "images", ".tif"), ("xml", "annotations", ".xml")):
            dest = out / sub / f"{name}{ext}"
            sha, size = f.get(f"{kind}_sha256"), f.get(f"{kind}_size")
            if _verified(dest, sha, size):
                continue
            if mirror is not None:
                _copy_verified(Path(mirror) / sub / f"{name}{ext}", dest, sha256=sha, size=size)
            else:
                url = tmpl.format(folder=folders[kind], file=f"{name}{ext}")
                download_file(url, dest, sha256=sha, expected_size=int(size) if size else None)
    (out / "SOURCE.md").write_text(f"MoNuSeg: {block.get('source')}\nLicence: {block.get('licence')}\n"
                                   f"Cite: {block.get('cite')}\n")
    return out


def download_consep(out_dir: str | os.PathLike, *, mirror: str | os.PathLike | None = None,
                    manifest: Any = None, keep_archive: bool = False) -> Path:
    """CoNSeP into ``out_dir``: the official archive unpacked (``CoNSeP/Train|Test/Images|Labels``),
    or a local copy (``--mirror``) of either that layout or the HoVer-Net patch export
    (``images/``, ``inst/``, ``type_mat/``), checked to be complete (every image has its labels).
    """
    block = _annotated_block("consep", manifest)
    out = Path(out_dir)
    if mirror is not None:
        from stlib.io.annotations import detect_layout

        mirror = Path(mirror)
        kind = detect_layout(mirror) if mirror.is_dir() else "missing"
        if kind == "consep_patches":
            stems = {sub: sorted(p.stem for p in (mirror / sub).iterdir() if p.is_file())
                     for sub in ("images", "inst", "type_mat")}
            if not stems["images"] or not (stems["images"] == stems["inst"] == stems["type_mat"]):
                raise InputError("the patch export is incomplete: images/, inst/ and type_mat/ must name the same "
                                 "patches", path=mirror, fix="point --mirror at a complete copy")
            with atomic_dir(out) as tmp:
                for sub in ("images", "inst", "type_mat"):
                    shutil.copytree(mirror / sub, tmp / sub)
                if (mirror / "LICENSE.md").is_file():
                    shutil.copy(mirror / "LICENSE.md", tmp / "LICENSE.md")
            return out
        root = next((c for c in (mirror, mirror / "CoNSeP") if (c / "Train").is_dir()), None)
        if root is None:
            raise InputError("not a CoNSeP copy (no CoNSeP/Train/ and no images/ + inst/ + type_mat/)", path=mirror)
        with atomic_dir(out) as tmp:
            shutil.copytree(root, tmp / "CoNSeP")
        return out
    if (out / "CoNSeP" / "Train" / "Labels").is_dir():
        return out
    archive = out.parent / f".{out.name}.archives" / block.get("file", "consep.zip")
    download_file(block["url"], archive, sha256=block.get("sha256"),
                  expected_size=int(block["size"]) if block.get("size") else None)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        archive.unlink(missing_ok=True)
        raise DownloadError("not a valid zip archive; it was deleted", path=archive, fix="run again") from e
    with zf, atomic_dir(out) as tmp:
        base = tmp.resolve()
        for info in zf.infolist():
            target = (base / info.filename).resolve()
            if base != target and base not in target.parents:
                raise DownloadError(f"archive member {info.filename!r} points outside the folder", path=archive)
        zf.extractall(base)
        found = [p for p in base.rglob("Train") if (p / "Labels").is_dir()]
        if not found:
            raise DownloadError("archive has no Train/Labels folder", path=archive, fix="check the URL in the manifest")
        if found[0].parent != base / "CoNSeP":
            os.replace(found[0].parent, base / "_consep")
            os.replace(base / "_consep", base / "CoNSeP")
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stlib download",
                                description="Download HEST-1k samples, PanNuke folds or a single URL "
                                            "(resumable; finished files are skipped). The Hugging Face token "
                                            "is read from HF_TOKEN or `hf auth login`, never from the command line.")
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hest", help="HEST-1k samples by id (Hugging Face, or --mirror DIR)")
    h.add_argument("--ids", nargs="+", required=True, help="sample ids, e.g. TENX95 NCBI783")
    h.add_argument("--out", required=True, type=Path, help="HEST root to fill ({data_dir}/hest)")
    h.add_argument("--mirror", type=Path, help="copy from a local folder in the HEST layout instead")
    h.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=list(HEST_KINDS),
                   help="file kinds per sample (default: all)")
    h.add_argument("--repo-id", default=HEST_REPO_ID)
    h.add_argument("--revision", default=None)
    h.add_argument("--allow-missing", action="store_true", help="warn instead of failing on absent files")
    h.add_argument("--force", action="store_true", help="ask the Hub even when all files are present")
    h.add_argument("--offline", action="store_true", default=None, help="never use the network")
    h.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    pn = sub.add_parser("pannuke", help="PanNuke fold archives, unpacked as 'Fold k/'")
    pn.add_argument("--out", required=True, type=Path, help="PanNuke root ({data_dir}/pannuke)")
    pn.add_argument("--folds", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    pn.add_argument("--manifest", type=Path, default=None, help="data_manifest.yaml (default: the repository's)")
    mo = sub.add_parser("monuseg", help="MoNuSeg images + XML outlines (checksummed; or --mirror DIR)")
    mo.add_argument("--out", required=True, type=Path, help="folder to fill (images/, annotations/)")
    mo.add_argument("--mirror", type=Path, help="copy from a local MoNuSeg folder (or a folder holding nuclei-monuseg/) "
                                                "instead (checksums still checked)")
    mo.add_argument("--names", nargs="+", default=None, help="image names (default: all of the manifest)")
    mo.add_argument("--manifest", type=Path, default=None, help="data_manifest.yaml (default: the repository's)")
    co = sub.add_parser("consep", help="CoNSeP (official archive, or --mirror DIR)")
    co.add_argument("--out", required=True, type=Path, help="folder to create")
    co.add_argument("--mirror", type=Path, help="a local copy: CoNSeP/Train|Test or the patch export (or a folder "
                                                "holding nuclei-consep/)")
    co.add_argument("--manifest", type=Path, default=None, help="data_manifest.yaml (default: the repository's)")
    u = sub.add_parser("url", help="one file over HTTP(S), resumable, optionally SHA-256 checked")
    u.add_argument("url")
    u.add_argument("--out", required=True, type=Path, help="destination file")
    u.add_argument("--sha256", default=None, help="expected SHA-256 (hex)")
    u.add_argument("--retries", type=int, default=3)
    return p


def cli_main(argv: list[str]) -> int:
    """``stlib download {hest,pannuke,monuseg,consep,url} ...``; prints the path written."""
    args = _parser().parse_args(argv)
    if args.what == "hest":
        out = download_hest(args.ids, args.out, repo_id=args.repo_id, revision=args.revision, kinds=args.kinds,
                            offline=args.offline, mirror=args.mirror, allow_missing=args.allow_missing,
                            force=args.force, endpoint=args.endpoint)
    elif args.what == "pannuke":
        out = download_pannuke(args.out, folds=args.folds, manifest=args.manifest)
    elif args.what == "monuseg":
        mirror = annotated_mirror(args.mirror, "monuseg") if args.mirror else None
        out = download_monuseg(args.out, mirror=mirror, names=args.names, manifest=args.manifest)
    elif args.what == "consep":
        out = download_annotated("consep", args.out, mirror=args.mirror, manifest=args.manifest)
    else:
        out = download_file(args.url, args.out, sha256=args.sha256, retries=args.retries)
    print(out)
    return 0
