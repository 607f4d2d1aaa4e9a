"""Locations: a local path or an s3:// URI, resolved to a pyarrow filesystem and a path.

Every location in config goes through :func:`resolve`. S3 credentials and endpoint come from
``StorageConfig`` or the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from model.config import StorageConfig


@dataclass(frozen=True)
class Location:
    uri: str  # what the user wrote
    filesystem: pafs.FileSystem
    path: str  # path inside the filesystem (bucket/key for S3, absolute for local)

    @property
    def is_s3(self) -> bool:
        return isinstance(self.filesystem, pafs.S3FileSystem)

    def join(self, *parts: str) -> Location:
        sep = "/"
        path = sep.join([self.path.rstrip(sep), *[p.strip(sep) for p in parts]])
        uri = sep.join([self.uri.rstrip(sep), *[p.strip(sep) for p in parts]])
        return Location(uri, self.filesystem, path)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(storage: StorageConfig | None = None) -> pafs.S3FileSystem:
    storage = storage or StorageConfig()
    endpoint = storage.resolved_endpoint()
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    key = storage.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = storage.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    if is_s3(uri):
        return Location(uri, s3_filesystem(storage), uri[len("s3://") :].rstrip("/"))
    return Location(uri, pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)))


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_parquet(
    uris: list[str] | str, storage: StorageConfig | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    """Expand files, directories and globs into parquet file paths on one filesystem.

    Raises FileNotFoundError naming the location when it matches nothing.
    """
    if isinstance(uris, str):
        uris = [uris]
    if not uris:
        raise FileNotFoundError("no locations given")
    fs = None
    files: list[str] = []
    for uri in uris:
        loc = resolve(uri, storage)
        if fs is None:
            fs = loc.filesystem
        elif type(fs) is not type(loc.filesystem):
            raise ValueError(f"locations mix local paths and s3:// URIs: {uris}")
        found = _expand(loc)
        if not found:
            raise FileNotFoundError(f"{uri}: no parquet files found")
        files.extend(found)
    return fs, sorted(set(files))


def _expand(loc: Location) -> list[str]:
    fs, path = loc.filesystem, loc.path
    if _has_glob(path):
        base = path
        while _has_glob(base):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatch(i.path, path)
            and i.path.endswith(".parquet")
        ]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not any(part.startswith((".", "_")) for part in i.path[len(path) :].split("/"))
        ]
    return []


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    loc = resolve(uri, storage)
    return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound


def remove(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a directory tree (or file) if it exists."""
    loc = resolve(uri, storage)
    info = loc.filesystem.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.filesystem.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.filesystem.delete_file(loc.path)


def write_text(uri: str, text: str, storage: StorageConfig | None = None) -> None:
    loc = resolve(uri, storage)
    parent = loc.path.rsplit("/", 1)[0]
    loc.filesystem.create_dir(parent, recursive=True)
    with loc.filesystem.open_output_stream(loc.path) as out:
        out.write(text.encode())


def read_text(uri: str, storage: StorageConfig | None = None) -> str:
    loc = resolve(uri, storage)
    with loc.filesystem.open_input_stream(loc.path) as f:
        return f.read().decode()
