"""aiosmtpd handler for the test SMTP server process: every mail becomes a file.

Run as ``python -m aiosmtpd -n -l 127.0.0.1:PORT -c mail_sink.SaveToDir DIR``
with this directory on PYTHONPATH.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class SaveToDir:
    def __init__(self, directory: str):
        self.directory = Path(directory)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("SaveToDir takes the output directory")
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".mail", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(envelope.content if isinstance(envelope.content, bytes)
                      else envelope.content.encode())
        os.replace(tmp, tmp[: -len(".tmp")].replace(".mail", "mail") + ".eml")
        return "250 Message accepted for delivery"
