"""The tailer against a model, under random appends, rotations, truncations and
deletions (issue 10; the model is Vector's file-source
``file_watcher/tests/experiment.rs``).

The model knows the files by identity (an inode), what each holds, which one
the tailer holds and how many of its lines it has handed out. A read step runs
the real tailer and the model's rule side by side and compares what each
delivers. Whatever the steps, the delivered lines are each written line at most
once, in the order written. Lines are lost only by design: truncated in place
before the tailer read them, or in a file deleted (or, copied, in a copy it
cannot reach) while the tailer was elsewhere; every loss shows as a seq gap in
the fold of what was delivered. copytruncate of the file being read loses
nothing: the tailer reads the rest from the copy.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sigil._native import Fold, Tailer

LIVE = "execution.jsonl"


def line(seq: int) -> bytes:
    """One event line; all lines have the same width, so the file's length in
    lines says its length in bytes."""
    return orjson.dumps(
        {
            "timestamp": "2026-01-01T00:00:00+00:00",
            "session_id": "m",
            "event_type": "step_complete",
            "component": "c",
            "message": "x" * (7 - len(str(seq))),
            "tokens": 1,
            "metadata": {},
            "seq": seq,
        }
    )


@dataclass
class ModelFile:
    lines: list[int] = field(default_factory=list)


class TailerMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tailer-model-"))
        self.path = self.dir / LIVE
        self.tailer = Tailer(self.path)
        self.files: dict[int, ModelFile] = {}
        self.next_file = 0
        self.live: int | None = None  # the file at the path
        self.segments: list[int] = []  # renamed or copied beside it, oldest first
        self.segment_names = 0
        self.held: int | None = None  # the file the tailer has open
        self.pos = 0  # lines of `held` handed out
        # The held file was truncated after the tailer read from it: at its next
        # read it notices (length below its offset, or other first bytes).
        self.restart = False
        self.copy_pending = False  # ... and the tailer will go on in its copy
        self.after_copy: int | None = None  # then back to the copied file, from 0
        self.written: list[int] = []
        self.delivered: list[int] = []
        self.truncations = 0

    def teardown(self) -> None:
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the file system --------------------------------------------------

    def _new_live(self) -> None:
        self.live = self.next_file
        self.files[self.live] = ModelFile()
        self.next_file += 1

    def _segment_path(self) -> Path:
        self.segment_names += 1
        return self.dir / f"execution_20260101_{self.segment_names:06d}.jsonl"

    @rule(n=st.integers(1, 5))
    def append(self, n: int) -> None:
        if self.live is None:
            self._new_live()
        assert self.live is not None
        seqs = list(range(len(self.written), len(self.written) + n))
        with open(self.path, "ab") as f:
            f.write(b"".join(line(s) + b"\n" for s in seqs))
        self.files[self.live].lines += seqs
        self.written += seqs

    @rule(create=st.booleans())
    def rotate(self, create: bool) -> None:
        """sigil's rotation: rename to the next segment name (then, like
        logrotate's ``create``, maybe a new empty file at the path at once)."""
        if self.live is None:
            return
        os.rename(self.path, self._segment_path())
        self.segments.append(self.live)
        self.live = None
        if create:
            self.path.touch()
            self._new_live()

    def _truncate_live(self) -> None:
        assert self.live is not None
        with open(self.path, "r+b") as f:
            f.truncate(0)
        if self.held == self.live and self.pos > 0:
            self.restart = True
        self.files[self.live].lines = []

    @rule()
    def copytruncate(self) -> None:
        if self.live is None:
            return
        target = self._segment_path()
        shutil.copyfile(self.path, target)
        copy = self.next_file
        self.next_file += 1
        self.files[copy] = ModelFile(list(self.files[self.live].lines))
        self.segments.append(copy)
        follows_copy = self.held == self.live and self.pos > 0 and not self.restart
        self._truncate_live()
        if follows_copy:
            # The tailer finds the copy by the first bytes of the file it had
            # read from, goes on there from its offset, then back to the path.
            self.after_copy = self.held
            self.held, self.restart, self.copy_pending = copy, False, True

    @rule()
    def truncate(self) -> None:
        if self.live is not None:
            self._truncate_live()

    @rule()
    def delete(self) -> None:
        if self.live is None:
            return
        self.path.unlink()
        self.live = None  # the tailer may still hold it open and read it to its end

    # -- reading -----------------------------------------------------------

    def _model_read(self) -> list[int]:
        out: list[int] = []
        if self.copy_pending:
            self.truncations += 1  # noticed (and counted) at this read
            self.copy_pending = False
        while True:
            if self.held is None:
                if self.live is None:
                    return out
                self.held, self.pos = self.live, 0
            held = self.files[self.held].lines
            if self.restart:
                self.pos, self.restart = 0, False
                self.truncations += 1
            out += held[self.pos :]
            self.pos = len(held)
            if self.after_copy is not None:
                self.held, self.pos, self.after_copy = self.after_copy, 0, None
                continue
            if self.held in self.segments and self.held != self.segments[-1]:
                self.held = self.segments[self.segments.index(self.held) + 1]
                self.pos = 0
                continue
            if self.live is not None and self.live != self.held and self.files[self.live].lines:
                self.held, self.pos = self.live, 0
                continue
            return out

    @rule()
    def read(self) -> None:
        got = []
        while batch := self.tailer.read_lines(max_lines=7):
            got += [orjson.loads(x)["seq"] for x in batch]
        expected = self._model_read()
        assert got == expected
        self.delivered += got

    @invariant()
    def each_line_at_most_once_in_order(self) -> None:
        if hasattr(self, "delivered"):
            assert all(a < b for a, b in itertools.pairwise(self.delivered))

    @invariant()
    def truncations_are_counted(self) -> None:
        if hasattr(self, "tailer"):
            assert self.tailer.stats()["truncations"] >= self.truncations

    @rule()
    def finish(self) -> None:
        """One more line and a read: it arrives, and every line lost by design
        after the first one delivered is inside the stream, where the fold of
        what was delivered counts it as missing. (Lines lost before the tailer
        first read anything leave no gap in its stream: the session's reader
        starts from the oldest segment instead, see test_segments.py.)"""
        self.append(1)
        self.read()
        assert self.delivered[-1] == self.written[-1]
        fold = Fold(0)
        fold.feed_bytes(b"".join(line(s) + b"\n" for s in self.delivered))
        summary = fold.summary()
        lost = [s for s in self.written if s >= self.delivered[0] and s not in self.delivered]
        assert summary["seq_missing"] == len(lost)
        assert summary["seq_regressions"] == 0


TailerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SIGIL_MODEL_EXAMPLES", "300")),
    stateful_step_count=40,
    deadline=None,
)
test_tailer_against_the_model = TailerMachine.TestCase
