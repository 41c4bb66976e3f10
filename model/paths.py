"""What the commands and the server take as a path to a file or folder, and refuse: an empty one, and a URL; and
whom a path is refused to, where permissions refuse it.

Path('') is the current folder, so `vit-predict "$IMAGE"` with IMAGE unset classified every image under it,
`vit-train --out-dir "$RUN"` wrote a run into it, and VIT_CHECKPOINT= was served as `.: a folder`. Path() folds
a URL's two slashes, so `vit-predict https://host/x.png` was told that `https:/host/x.png` does not exist.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from pathlib import Path

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # https://, s3://, hf://: a scheme, then two slashes


def path_problem(text: str) -> str | None:
    """Why `text` cannot name a file or folder, or None."""
    if not text:
        return "an empty path (an unset variable?): name a file or folder"
    if URL.match(text):
        how = f" (curl -sLO {text})" if text.lower().startswith(("http://", "https://")) else ""
        return f"a URL, not a path: download it first{how}"
    return None


def this_user() -> str:
    """'user vit (uid 10001)': whom permissions refuse, named, since in a container (mounting a host's folder) it is
    not the user who typed the command, and the uid is what the folder's owner compares."""
    try:
        return f"user {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except KeyError:  # a container run with --user of an id that has no name
        return f"uid {os.getuid()}"


def mode_and_owner(path: Path) -> str:
    """'drwxr-xr-x, owned by uid 0', as ls -ln shows them."""
    status = path.stat()
    return f"{stat.filemode(status.st_mode)}, owned by uid {status.st_uid}"


def access_problem(path: Path) -> str | None:
    """Why this user may not read `path`, or None. safetensors says "No such file or directory" of a file that
    it may not read, and pathlib raises PermissionError of one in a folder it may not enter: a checkpoint
    mounted into a container, whose user is not the files' owner, met both."""
    for folder in reversed(path.absolute().parents):  # from the root down: each one's parent may be entered
        if not folder.exists():
            return None
        if not os.access(folder, os.X_OK):
            return f"permission denied: {this_user()} may not enter {folder}"
    if path.exists() and not os.access(path, os.R_OK):
        return f"permission denied: {this_user()} may not read it ({mode_and_owner(path)})"
    return None
