"""Model test: chord runs (CHORD field 6, log record CHORD_RUN) replay and compact to the live state.

Random sequences of CHORD (with no run, the current run, or a new one), members' results, and
compactions; after each step a fresh state that replays the log as it stands (the records since the
last compaction's start, as start-up would read it) holds the same chords, counts, runs and fired
chords, and has published the same bodies, as the live one.  A body is published only once every
member stored a result after the run was declared.
"""

from __future__ import annotations

import cbor2
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.state import BrokerState

W = 1
T0 = 1_800_000_000.0
CHORDS = {"c1": ["a1", "a2"], "c2": ["b1"]}


def _spec(cid):
    return {"queue": "celery", "body": {"task": "t.body", "id": f"{cid}-body", "args": [], "kwargs": {}}}


def _view(state):
    chords = {cid: (list(ch["members"]), sorted(ch["pending"]), ch["results"], ch["run"])
              for cid, ch in state.chords.items()}
    bodies = sorted(m.id + repr(cbor2.loads(m.body)["args"]) for m in state.live_messages())
    return chords, dict(state._fired_chords), dict(state._chord_of), bodies


class ChordRuns(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = BrokerState()
        self.s.enable_log()
        self.s.connect(W)
        self.log = []  # (lsn, type, payload) as start-up reads them
        self.lsn = 0
        self.runs = 0
        self.fresh = {}  # chord id -> members that stored a result since its current run began

    def _take(self):
        for t, p in self.s.take_records():
            self.lsn += 1
            self.log.append((self.lsn, t, cbor2.loads(cbor2.dumps(p))))

    @rule(cid=st.sampled_from(sorted(CHORDS)), how=st.sampled_from(["none", "same", "new"]))
    def declare(self, cid, how):
        ch = self.s.chords.get(cid)
        if how == "new":
            self.runs += 1
            run = f"r{self.runs}"
        elif how == "same":
            run = ch["run"] if ch is not None else self.s._fired_chords.get(cid)
            run = run if isinstance(run, str) else None
        else:
            run = None
        before = dict(self.s._fired_chords)
        if ch is None and cid not in before:  # a first declaration: what already finished counts
            self.fresh[cid] = {m for m in CHORDS[cid] if m in self.s.results}
        elif how == "new":  # a new run: only what its members store from now on
            self.fresh[cid] = set()
        self.s.chord_declare(cid, CHORDS[cid], _spec(cid), None, T0, run=run)
        self._take()

    @rule(cid=st.sampled_from(sorted(CHORDS)), i=st.integers(0, 1), value=st.integers(0, 9))
    def result(self, cid, i, value):
        members = CHORDS[cid]
        m = members[i % len(members)]
        self.s.result_set(W, m, "SUCCESS", value, None, T0)
        self.fresh.setdefault(cid, set()).add(m)
        self._take()

    @rule()
    def compact(self):
        through = self.lsn
        self.s.compact(through)
        start = self.lsn + 1
        self._take()
        self.log = [r for r in self.log if r[0] >= start or r[0] > through]

    @invariant()
    def replay_matches_live(self):
        again = BrokerState()
        again.replay(self.log, T0)
        assert _view(again) == _view(self.s)

    @invariant()
    def a_waiting_run_counts_only_its_own_results(self):
        for cid, ch in self.s.chords.items():
            assert set(ch["results"]) <= self.fresh[cid], (cid, ch["results"], self.fresh[cid])


TestChordRuns = ChordRuns.TestCase
TestChordRuns.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
