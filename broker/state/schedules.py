"""Periodic schedules, durable revokes and chord barriers: workflow state kept by the broker.

Schedules
    A named entry (every N seconds, or a crontab in a time zone) that brokerd
    fires by enqueueing a message.  Each firing is one log record naming the
    tick it belongs to and carrying the message, so after a crash or restart
    the broker knows the last tick fired: a tick fires exactly once.  After
    downtime the entry's catch-up policy decides what the missed ticks do:
    ``latest`` (fire once, for the most recent), ``all`` (fire each, up to
    MAX_CATCHUP), ``skip`` (fire none).  A tick is *missed* when brokerd first
    looks at it more than MISSED_AFTER seconds late.

Revokes
    A revoked task id is kept (and logged) for a window; a message with that
    id is dropped instead of delivered and its result becomes REVOKED.

Chords
    A barrier counts its header members' final results.  A member's
    RESULT_SET is the logged change; when the last member succeeds the body
    message is published with the members' results, in order, prepended to
    its args — once (the firing is logged too).  A waiting chord may grow
    (CHORD_ADD: Celery's ``add_to_chord``); the added members are logged.  A failed member fails the
    chord: the error callback, if any, is published instead; the body never is.  A CHORD is
    idempotent per chord id (a retried CHORD never fires twice), unless it names a *run* the chord is
    not at: a new run of the same chord id (Celery's frozen chord applied again) waits for its
    members afresh, counting only the results they store after it (logged as CHORD_RUN).

A mixin of BrokerState.  Pure: ``now`` is passed in.
"""

from __future__ import annotations

import cbor2
from sortedcontainers import SortedList

from broker.errors import BadRequest, NotFound
from broker.state import log_records as R
from broker.state.cron import timing_from
from broker.state.queue import GONE, MAX_PRIORITY, Message, validate_queue_name

CATCHUP_POLICIES = ("latest", "all", "skip")
MISSED_AFTER = 5.0  # seconds late at first sight: the tick was missed (downtime), not merely due
MAX_CATCHUP = 1000  # firings one entry may make at once under catchup=all
DEFAULT_REVOKE_TTL = 24 * 3600.0  # seconds a revoke is remembered
MAX_NAME = 200
MAX_FIRED_CHORDS = 100_000  # fired chord ids remembered against a retried CHORD (~100 B each)
MAX_CHORD_RUN = 255  # characters of a chord run's name (the SDK's: a UUID, 36)
CHORD_OPTIONS = ("run",)  # CHORD field 6
SCHEDULE_KEYS = ("every", "anchor", "cron", "tz", "queue", "priority", "body", "catchup", "expires", "owner")


# The result states a plain revoke (no terminate) replaces by REVOKED: the task has not started.  A task
# a worker has started (STARTED, or its own state such as PROGRESS) keeps its state: without terminate
# it runs on and its worker stores the outcome, as Celery's own revoke leaves it (worker/control.py).
REVOCABLE_STATES = frozenset({"PENDING", "RECEIVED", "RETRY", "REJECTED", "REVOKED"})

class Schedule:
    __slots__ = ("name", "spec", "timing", "queue", "priority", "body", "catchup", "expires", "owner",
                 "paused", "next", "last_tick", "fired", "created", "lsn")

    def to_wire(self) -> dict:
        return {
            "name": self.name, "spec": self.spec, "timing": self.timing.describe(), "paused": self.paused,
            "next": self.next, "last_tick": self.last_tick, "fired": self.fired, "catchup": self.catchup,
            "queue": self.queue, "owner": self.owner,
        }


def check_spec(name, spec, now) -> Schedule:
    if type(name) is not str or not name or len(name) > MAX_NAME or any(c.isspace() for c in name):
        raise BadRequest(f"a schedule name is 1 to {MAX_NAME} characters without spaces (got {name!r})")
    if type(spec) is not dict:
        raise BadRequest("a schedule spec must be a map")
    for k in spec:
        if k not in SCHEDULE_KEYS:
            raise BadRequest(f"unknown schedule field {k!r}; known fields: {', '.join(SCHEDULE_KEYS)}")
    e = Schedule()
    e.name = name
    e.spec = spec
    e.timing = timing_from(spec, now)
    e.queue = validate_queue_name(spec.get("queue", "celery"))
    e.priority = spec.get("priority", 0)
    if type(e.priority) is not int or not 0 <= e.priority <= MAX_PRIORITY:
        raise BadRequest(f"schedule priority must be a whole number from 0 to 255 (got {e.priority!r})")
    e.body = spec.get("body")
    if e.body is None:
        raise BadRequest("a schedule needs a body: the task envelope (a map) or bytes to enqueue")
    e.catchup = spec.get("catchup", "latest")
    if e.catchup not in CATCHUP_POLICIES:
        raise BadRequest(f"catchup must be one of latest, all, skip (got {e.catchup!r})")
    e.expires = spec.get("expires")
    if e.expires is not None and (type(e.expires) not in (int, float) or not 0 < e.expires < float("inf")):
        raise BadRequest(f"expires must be a number of seconds > 0 (got {e.expires!r})")
    e.owner = spec.get("owner")
    if e.owner is not None and (type(e.owner) is not str or len(e.owner) > MAX_NAME):
        raise BadRequest(f"owner must be a text string of at most {MAX_NAME} characters (got {e.owner!r})")
    e.paused = False
    e.last_tick = None
    e.fired = 0
    e.created = now
    e.lsn = 0
    e.next = e.timing.next_after(now)
    if e.next is None:
        raise BadRequest(f"{e.timing.describe()} never matches a date (e.g. February 30th); check day and month")
    return e


class WorkflowMixin:
    def _init_workflow(self):
        self.schedules: dict[str, Schedule] = {}
        self._sched_due = SortedList()  # (next, name)
        self.revoked: dict[str, float] = {}  # task id -> remembered until
        self._revoke_ttl = SortedList()  # (until, id)
        self.default_revoke_ttl = DEFAULT_REVOKE_TTL
        self.chords: dict[str, dict] = {}
        # chord ids already fired, so a retried CHORD does not fire again; bounded, oldest dropped.  The value
        # is the run that fired (text), or True for a chord declared without one
        self._fired_chords: dict[str, str | bool] = {}
        self._chord_of: dict[str, str] = {}  # member task id -> chord id

    # -- schedules -------------------------------------------------------------------
    def schedule_put(self, name, spec, now: float) -> dict:
        self._refuse_if_log_failed()
        e = check_spec(name, spec, now)
        old = self.schedules.get(name)
        if old is not None:
            if old.spec == spec:
                return old.to_wire()  # idempotent: many deploys may push the same entry
            e.last_tick, e.fired, e.paused = old.last_tick, old.fired, old.paused
            e.created = old.created if spec.get("every") == old.spec.get("every") else now
            if "every" in spec and "anchor" not in spec and spec.get("every") == old.spec.get("every"):
                e.timing = timing_from({**spec, "anchor": old.timing.anchor}, now)
            e.next = e.timing.next_after(max(now, e.last_tick or now))
            self._sched_due.discard((old.next, name))
        self._install_schedule(e)
        e.lsn = self._log(R.SCHED_PUT, [name, spec, e.created, getattr(e.timing, "anchor", None)])
        return e.to_wire()

    def _install_schedule(self, e: Schedule) -> None:
        self.schedules[e.name] = e
        if not e.paused and e.next is not None:
            self._sched_due.add((e.next, e.name))

    def schedule_remove(self, name, now: float) -> bool:
        self._refuse_if_log_failed()
        e = self.schedules.pop(name, None)
        if e is None:
            return False
        self._sched_due.discard((e.next, name))
        self._log(R.SCHED_REMOVE, name)
        return True

    def schedule_pause(self, name, paused: bool, now: float) -> dict:
        self._refuse_if_log_failed()
        e = self.schedules.get(name)
        if e is None:
            raise NotFound(f"no schedule named {name!r}")
        if e.paused != paused:
            self._sched_due.discard((e.next, name))
            e.paused = paused
            if not paused:  # ticks while paused are skipped, not caught up
                e.next = e.timing.next_after(now)
                if e.next is not None:
                    self._sched_due.add((e.next, name))
            self._log(R.SCHED_PAUSE, [name, paused, now])
        return e.to_wire()

    def schedule_list(self, owner=None) -> list:
        return [e.to_wire() for e in sorted(self.schedules.values(), key=lambda e: e.name)
                if owner is None or e.owner == owner]

    def _tick_schedules(self, now: float) -> None:
        due = self._sched_due
        while due and due[0][0] <= now:
            _, name = due.pop(0)
            e = self.schedules.get(name)
            if e is None or e.paused or e.next is None or e.next > now:
                continue
            ticks = []
            t = e.next
            jumped = False
            while t is not None and t <= now:
                ticks.append(t)
                if len(ticks) > MAX_CATCHUP:
                    ticks.pop(0)
                    if not jumped:
                        # Long downtime: jump close to now instead of walking every missed
                        # tick (an every=1ms entry after a day down is 86 million of them).
                        jumped = True
                        timing = e.timing
                        if hasattr(timing, "seconds"):
                            k = int((now - timing.anchor) // timing.seconds) - MAX_CATCHUP
                            t = max(t, timing.anchor + k * timing.seconds)
                        else:
                            t = max(t, timing.next_after(now - 7 * 86400) or t)
                        ticks = []
                        continue
                t = e.timing.next_after(t)
            on_time = [x for x in ticks if now - x <= MISSED_AFTER]
            if e.catchup == "all":
                fire = ticks
            elif e.catchup == "latest":
                fire = ticks[-1:]
            else:
                fire = on_time
            for tick in ticks:
                if tick in fire:
                    self._fire(e, tick, now)
            if ticks and ticks[-1] not in fire:
                # remember that the skipped ticks are done, so a restart does not revisit them
                e.last_tick = ticks[-1]
                self._log(R.SCHED_TICK, [name, ticks[-1], None])
            e.next = t
            if t is not None:
                due.add((t, name))

    def _fire(self, e: Schedule, tick: float, now: float) -> None:
        msg_id = f"{e.name}@{tick:.3f}"
        body = e.body
        expires = tick + e.expires if e.expires is not None else None
        if type(body) is dict:
            env = dict(body)
            env["id"] = msg_id
            env["root_id"] = msg_id
            if expires is not None:
                env["expires"] = expires
            body = cbor2.dumps(env)
        elif type(body) is not bytes:
            body = cbor2.dumps(body)
        q = self.queue(e.queue)
        msg = Message(self._next_seq(), msg_id, q, body, e.priority, {"x-schedule": e.name, "x-tick": tick},
                      0, None, expires, now)
        q.published += 1
        e.last_tick = tick
        e.fired += 1
        self._log_created(msg, R.SCHED_TICK, [e.name, tick, R.message_payload(msg)])
        if expires is not None:
            self._ttl.add((expires, msg.seq, msg))
        q.push_ready(msg)
        if q.consumers and not q.paused:
            self._dispatch_queue(q, now)

    def _replay_schedule_record(self, t, p, lsn, msgs) -> None:
        if t == R.SCHED_PUT:
            name, spec, created = p[0], p[1], p[2]
            anchor = p[3] if len(p) > 3 else None
            old = self.schedules.get(name)
            e = check_spec(name, {**spec, "anchor": anchor} if anchor is not None and "every" in spec else spec, created)
            e.spec = spec
            if old is not None:
                e.last_tick, e.fired, e.paused = old.last_tick, old.fired, old.paused
            e.lsn = lsn
            self.schedules[name] = e
        elif t == R.SCHED_REMOVE:
            self.schedules.pop(p, None)
        elif t == R.SCHED_PAUSE:
            e = self.schedules.get(p[0])
            if e is not None:
                e.paused = bool(p[1])
                if len(p) > 2 and not e.paused:
                    e.last_tick = max(e.last_tick or 0, p[2])  # skip what passed while paused
        elif t == R.SCHED_TICK:
            name, tick, mp = p
            e = self.schedules.get(name)
            if e is not None:
                e.last_tick = tick
                if mp is not None:
                    e.fired += 1
            if mp is not None:
                m = self._message_from(mp, lsn)
                msgs[m.seq] = m
                m.queue.published += 1
        elif t == R.SCHED_STATE:
            name, last_tick, fired, paused = p
            e = self.schedules.get(name)
            if e is not None:
                e.last_tick, e.fired, e.paused = last_tick, fired, paused

    def _after_replay_schedules(self, now: float) -> None:
        self._sched_due = SortedList()
        for e in self.schedules.values():
            e.next = e.timing.next_after(e.last_tick if e.last_tick is not None else e.created)
            if not e.paused and e.next is not None:
                self._sched_due.add((e.next, e.name))

    def _compact_workflow(self, through_lsn: int) -> None:
        for e in self.schedules.values():
            self._log(R.SCHED_PUT, [e.name, e.spec, e.created, getattr(e.timing, "anchor", None)])
            self._log(R.SCHED_STATE, [e.name, e.last_tick, e.fired, e.paused])
        if self.revoked:
            self._log(R.REVOKE, [[[i, u] for i, u in self.revoked.items()], False])
        while len(self._fired_chords) > MAX_FIRED_CHORDS:
            self._fired_chords.pop(next(iter(self._fired_chords)))
        for cid, run in self._fired_chords.items():
            if run is True:
                self._log(R.CHORD_FIRE, [cid, True, None])
            else:  # the run that fired, without members: "remember it", nothing waits
                self._log(R.CHORD_RUN, [cid, run, None, None, None])
        for cid, ch in self.chords.items():
            if ch["run"] is None:
                self._log(R.CHORD, [cid, ch["members"], ch["body"], ch["error"]])
            else:
                self._log(R.CHORD_RUN, [cid, ch["run"], ch["members"], ch["body"], ch["error"]])
            for member, res in ch["results"].items():
                self._log(R.CHORD_MEMBER, [cid, member, res])

    # -- revokes -------------------------------------------------------------------------
    def revoke(self, task_ids, now: float, *, terminate=False, ttl=None) -> int:
        """Remember the ids as revoked; their waiting messages are dropped when due.

        Returns how many were not already revoked.  With ``terminate`` the
        server also tells every consumer connection to kill the running task.
        """
        self._refuse_if_log_failed()
        if type(task_ids) is str:
            task_ids = [task_ids]
        if type(task_ids) is not list or not task_ids:
            raise BadRequest("revoke needs a task id or a non-empty list of task ids")
        until = now + (ttl if ttl is not None else self.default_revoke_ttl)
        n = 0
        pairs = []
        for tid in task_ids:
            if type(tid) is not str or not tid:
                raise BadRequest(f"a task id is a non-empty text string (got {tid!r})")
            if tid not in self.revoked:
                n += 1
            self.revoked[tid] = until
            self._revoke_ttl.add((until, tid))
            pairs.append([tid, until])
        self._log(R.REVOKE, [pairs, bool(terminate)])
        for tid in task_ids:
            r = self.results.get(tid)
            if r is None or r.state in REVOCABLE_STATES or (terminate and r.state not in ("SUCCESS", "FAILURE")):
                self._revoked_result(tid, now)
        return n

    def _revoked_result(self, tid, now) -> None:
        expires = now + self.default_result_ttl
        r = self._store_result(tid, "REVOKED", None, {"exc_type": "TaskRevokedError", "exc_message": f"task {tid} was revoked"}, expires, now)
        r.lsn = self._log(R.RESULT, [tid, "REVOKED", None, r.meta, expires, now, None])

    def _drop_revoked(self, msg, now) -> None:
        msg.state = GONE
        msg.queue.expired += 1
        self._log(R.DROP, [msg.seq, "revoked"])
        if self._unique_of:
            self._unique_event(msg.id, started=False)  # never runs: its unique key frees

    def _tick_revokes(self, now: float) -> None:
        ttl = self._revoke_ttl
        while ttl and ttl[0][0] <= now:
            until, tid = ttl.pop(0)
            if self.revoked.get(tid) == until:
                del self.revoked[tid]

    def _replay_revoke(self, p, now) -> None:
        pairs, _terminate = p
        for tid, until in pairs:
            if until > now:
                self.revoked[tid] = until
                self._revoke_ttl.add((until, tid))

    # -- chords ---------------------------------------------------------------------------
    def chord_declare(self, chord_id, members, body, error, now: float, run=None) -> dict:
        """A barrier over ``members`` (task ids, in order).  ``body``/``error`` are
        message specs ``{"queue", "priority", "body"}``; ``body["body"]`` a task
        envelope map whose ``args`` get the members' results prepended.

        ``run`` (text, or None) names this run of the chord.  A CHORD for a chord id that waits or has
        fired changes nothing (a retried CHORD) when it names no run or the run the chord is at; naming
        another run starts that run: the chord (waiting or fired) is declared anew with these members
        and specs, and counts only the results its members store from now on (those stored before are
        the previous run's).  A first declaration counts the results already stored, with or without
        a run."""
        self._refuse_if_log_failed()
        if run is not None and (type(run) is not str or not 1 <= len(run) <= MAX_CHORD_RUN):
            raise BadRequest(f"chord run must be a text string of 1 to {MAX_CHORD_RUN} characters")
        if type(chord_id) is not str or not chord_id:
            raise BadRequest("a chord id is a non-empty text string")
        if type(members) is not list or not members or any(type(m) is not str for m in members):
            raise BadRequest("chord members must be a non-empty list of task ids")
        if len(set(members)) != len(members):
            raise BadRequest("chord members must be distinct task ids")
        for spec, what in ((body, "body"), (error, "error")):
            if spec is None and what == "error":
                continue
            if type(spec) is dict and "message" in spec:
                _check_raw_message(spec.get("message"), what)
            elif type(spec) is not dict or type(spec.get("body")) is not dict:
                raise BadRequest(f"chord {what} must be a map with 'queue' and 'body' (a task envelope map) "
                                 f"or 'message' (a raw message: body bytes, id, headers)")
            validate_queue_name(spec.get("queue", "celery"))
            prio = spec.get("priority", 0)
            if type(prio) is not int or not 0 <= prio <= MAX_PRIORITY:
                raise BadRequest(f"chord {what} priority must be a whole number from 0 to 255 (got {prio!r})")
        waiting = self.chords.get(chord_id)
        if waiting is not None and (run is None or run == waiting["run"]):
            return {"chord": chord_id, "pending": len(waiting["pending"])}
        fired = self._fired_chords.get(chord_id)
        if waiting is None and fired is not None and (run is None or run == fired):
            return {"chord": chord_id, "pending": 0}  # a retried CHORD after its body already went
        again = waiting is not None or fired is not None
        if run is None:
            self._log(R.CHORD, [chord_id, members, body, error])
        else:
            self._log(R.CHORD_RUN, [chord_id, run, members, body, error])
        self._run_chord(chord_id, run, members, body, error)
        ch = self.chords[chord_id]
        if again:
            return {"chord": chord_id, "pending": len(ch["pending"])}  # a new run: earlier results do not count
        # Members may have finished before the chord was declared: count them, and
        # log each count, so a restart does not see them pending again.
        for m in members:
            r = self.results.get(m)
            if r is not None and r.state in ("SUCCESS", "FAILURE", "REVOKED", "REJECTED") and not ch["done"]:
                self._log(R.CHORD_MEMBER, [chord_id, m, [r.state, r.value, r.meta]])
                self._chord_member_done(ch, m, r.state, r.value, r.meta, now)
        return {"chord": chord_id, "pending": len(ch["pending"])}

    def chord_add(self, chord_id, members, now: float) -> dict:
        """Grow a waiting chord by ``members`` (task ids), appended in order: Celery's
        ``self.add_to_chord(sig)`` from a task that is itself a member, so the chord cannot have
        fired yet.  Ids already members of this chord are skipped (a retried CHORD_ADD changes
        nothing); members that finished before being added count at once, as at declaration."""
        self._refuse_if_log_failed()
        if type(chord_id) is not str or not chord_id:
            raise BadRequest("a chord id is a non-empty text string")
        if type(members) is not list or not members or any(type(m) is not str or not m for m in members):
            raise BadRequest("CHORD_ADD members must be a non-empty list of task ids (non-empty text strings)")
        if len(set(members)) != len(members):
            raise BadRequest("CHORD_ADD members must be distinct task ids")
        ch = self.chords.get(chord_id)
        if ch is None or ch["done"]:
            how = "has already fired" if chord_id in self._fired_chords else "was never declared (CHORD)"
            raise NotFound(f"chord {chord_id!r} is not waiting: it {how}; members can only be added "
                           f"to a chord that waits for its members")
        for m in members:
            other = self._chord_of.get(m)
            if other is not None and other != chord_id:
                raise BadRequest(f"task {m!r} is already a member of chord {other!r}; a task counts toward one chord")
        new = [m for m in members if m not in ch["results"] and m not in ch["pending"]]
        if new:
            self._log(R.CHORD_ADD, [chord_id, new])
            self._add_chord_members(ch, new)
            for m in new:  # finished before it was added: counted now, and the count logged
                r = self.results.get(m)
                if r is not None and r.state in ("SUCCESS", "FAILURE", "REVOKED", "REJECTED") and not ch["done"]:
                    self._log(R.CHORD_MEMBER, [chord_id, m, [r.state, r.value, r.meta]])
                    self._chord_member_done(ch, m, r.state, r.value, r.meta, now)
        return {"chord": chord_id, "pending": len(ch["pending"])}

    def _add_chord_members(self, ch, members) -> None:
        ch["members"] = [*ch["members"], *members]
        ch["pending"].update(members)
        for m in members:
            self._chord_of[m] = ch["id"]

    def _install_chord(self, chord_id, members, body, error, run=None) -> None:
        self.chords[chord_id] = {
            "id": chord_id, "members": members, "pending": set(members), "results": {},
            "body": body, "error": error, "done": False, "run": run,
        }
        for m in members:
            self._chord_of[m] = chord_id

    def _run_chord(self, chord_id, run, members, body, error) -> None:
        """Live and in replay alike (CHORD, CHORD_RUN): a waiting run of this chord is dropped, its counts
        with it (its body never fires), and the chord waits anew for ``members``."""
        old = self.chords.pop(chord_id, None)
        if old is not None:
            for m in old["members"]:
                if self._chord_of.get(m) == chord_id:
                    del self._chord_of[m]
        self._install_chord(chord_id, members, body, error, run)

    def _chord_result_hook(self, task_id, state, value, meta, now) -> None:
        """Called with every stored final result: count it toward its chord."""
        cid = self._chord_of.get(task_id)
        if cid is None:
            return
        ch = self.chords.get(cid)
        if ch is not None and not ch["done"]:
            self._chord_member_done(ch, task_id, state, value, meta, now)

    def _chord_member_done(self, ch, member, state, value, meta, now, replaying=False) -> None:
        if member not in ch["pending"]:
            return  # a redelivered member finishing twice counts once
        ch["pending"].discard(member)
        ch["results"][member] = [state, value, meta]
        if state != "SUCCESS":  # FAILURE or REVOKED: the chord cannot complete
            self._finish_chord(ch, False, now, member, meta, replaying)
        elif not ch["pending"]:
            self._finish_chord(ch, True, now, None, None, replaying, last=member)

    def _finish_chord(self, ch, ok, now, failed_member, meta, replaying, last=None) -> None:
        ch["done"] = True
        if replaying:
            return  # the CHORD_FIRE record (or its absence) decides, see replay
        spec = ch["body"] if ok else ch["error"]
        body_env = ch["body"].get("body") or ch["body"]["message"]  # both carry the body's "id"
        payload = None
        if spec is not None and "message" in spec:
            # The raw variant (a Celery message): published verbatim, the outcome in one header.
            raw = spec["message"]
            headers = dict(raw.get("headers") or {})
            if ok:
                headers["x-chord-results"] = [ch["results"][m][1] for m in ch["members"]]
                if last is not None:  # Celery's body is started by the member that completed the chord
                    headers["x-chord-last"] = last
            else:
                headers["x-chord-error"] = {"member": failed_member, "exc_type": (meta or {}).get("exc_type"),
                                            "exc_message": (meta or {}).get("exc_message")}
            q = self.queue(spec.get("queue", "celery"))
            mid = raw.get("id") or f"{ch['id']}:{'body' if ok else 'error'}"
            msg = Message(self._next_seq(), mid, q, raw["body"], spec.get("priority", 0), headers, 0, None, None, now)
            q.published += 1
            payload = R.message_payload(msg)
        elif spec is not None:
            env = dict(spec["body"])
            if ok:
                results = [ch["results"][m][1] for m in ch["members"]]
                env["args"] = [results, *env.get("args", [])]
                # as x-chord-last above: the member that completed the chord started it; a signed body keeps
                # the producer's parent_id, which its signature covers (client/signing.py)
                if last is not None and "sig" not in env:
                    env["parent_id"] = last
            else:
                env["args"] = [failed_member, (meta or {}).get("exc_type"), (meta or {}).get("exc_message"),
                               *env.get("args", [])]
            q = self.queue(spec.get("queue", "celery"))
            mid = env.get("id") or f"{ch['id']}:{'body' if ok else 'error'}"
            env["id"] = mid
            msg = Message(self._next_seq(), mid, q, cbor2.dumps(env), spec.get("priority", 0), None, 0, None, None, now)
            q.published += 1
            payload = R.message_payload(msg)
        lsn = self._log(R.CHORD_FIRE, [ch["id"], ok, payload])
        if not ok:
            body_id = body_env.get("id")
            if body_id:
                exc = {"exc_type": "ChordError",
                       "exc_message": f"chord member {failed_member} failed: {(meta or {}).get('exc_type')}: {(meta or {}).get('exc_message')}"}
                expires = now + self.default_result_ttl
                self._store_result(body_id, "FAILURE", None, exc, expires, now)
                self._log(R.RESULT, [body_id, "FAILURE", None, exc, expires, now, None])
        self._forget_chord(ch)
        if payload is not None:
            if lsn != msg.seq:
                msg.lsn = lsn
            q.push_ready(msg)
            if q.consumers and not q.paused:
                self._dispatch_queue(q, now)

    def _forget_chord(self, ch) -> None:
        self.chords.pop(ch["id"], None)
        self._fired_chords.pop(ch["id"], None)  # the newest fired last: the bound drops the oldest first
        self._fired_chords[ch["id"]] = ch["run"] if ch["run"] is not None else True
        for m in ch["members"]:
            if self._chord_of.get(m) == ch["id"]:
                del self._chord_of[m]

    def _replay_chord_record(self, t, p, lsn, msgs, now) -> None:
        if t == R.CHORD:
            cid, members, body, error = p
            if cid not in self.chords:
                self._install_chord(cid, members, body, error)
        elif t == R.CHORD_RUN:
            cid, run, members, body, error = p
            if members is None:  # compaction: the run that fired last
                self._fired_chords.pop(cid, None)
                self._fired_chords[cid] = run
            elif self.chords.get(cid, {}).get("run") != run:  # the same run again: compaction's rewrite
                self._run_chord(cid, run, members, body, error)
        elif t == R.CHORD_ADD:
            cid, members = p
            ch = self.chords.get(cid)
            if ch is not None:
                self._add_chord_members(ch, [m for m in members if m not in ch["results"] and m not in ch["pending"]])
        elif t == R.CHORD_MEMBER:
            cid, member, res = p
            ch = self.chords.get(cid)
            if ch is not None and member in ch["pending"]:
                ch["pending"].discard(member)
                ch["results"][member] = res
        elif t == R.CHORD_FIRE:
            cid, ok, payload = p
            ch = self.chords.get(cid)
            if ch is not None:
                self._forget_chord(ch)
            else:
                self._fired_chords[cid] = True
            if payload is not None:
                m = self._message_from(payload, lsn)
                msgs[m.seq] = m
                m.queue.published += 1

    def _after_replay_chords(self, now: float) -> None:
        """A chord whose last member's result was logged but whose firing was not: fire now."""
        for ch in list(self.chords.values()):
            if ch["done"] or any(r[0] != "SUCCESS" for r in ch["results"].values()) or not ch["pending"]:
                failed = next((m for m, r in ch["results"].items() if r[0] != "SUCCESS"), None)
                if failed is not None:
                    self._finish_chord(ch, False, now, failed, ch["results"][failed][2], False)
                elif not ch["pending"]:
                    self._finish_chord(ch, True, now, None, None, False)


RAW_CHORD_KEYS = ("body", "id", "headers")  # what a raw chord message spec may carry


def _check_raw_message(raw, what) -> None:
    """The raw variant of a chord message spec: ``{"body": bytes, "id": text?, "headers": map?}``."""
    if type(raw) is not dict or type(raw.get("body")) is not bytes:
        raise BadRequest(f"chord {what} 'message' must be a map with 'body' (a byte string)")
    extra = sorted(set(raw) - set(RAW_CHORD_KEYS), key=repr)  # keys of any type: a map off the wire
    if extra:
        raise BadRequest(f"chord {what} 'message' has unknown key(s) {', '.join(map(repr, extra))}; known: body, id, headers")
    mid = raw.get("id")
    if mid is not None and (type(mid) is not str or not 1 <= len(mid) <= 255):
        raise BadRequest(f"chord {what} message id must be a text string of 1 to 255 characters")
    if raw.get("headers") is not None and type(raw["headers"]) is not dict:
        raise BadRequest(f"chord {what} message headers must be a map")
