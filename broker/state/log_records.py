"""The write-ahead-log vocabulary of the broker state.

The state emits ``(type, payload)`` pairs as it changes; the log (``broker.wal``)
frames, checksums and persists them without looking inside; on start-up the
state replays them (``BrokerState.replay``).  Payloads are plain CBOR-able
values.  Adding a type is backward compatible; changing a payload's shape
means bumping the log's format version.

type       payload                                         meaning
---------  ----------------------------------------------  -----------------------------------
PUBLISH    message (see ``message_payload``)                a message was accepted
DELIVER    seq | [seq, ...]                                 handed to consumers (attempts += 1 each)
ACK        seq | [seq, ...]                                 done
REQUEUE    [seq, attempts, ready_at | null, headers?]       it went back (nack, timeout, disconnect);
                                                            a 4th item replaces its headers
DEAD       [old seq, message in its dead-letter queue]     it moved to the dead-letter queue
MOVE       [old seq, message in its new queue]              REQUEUE-DEAD moved it back
DROP       [seq, reason]                                   dead-lettered with no dead-letter queue
EXPIRE     seq                                              its TTL passed before delivery
DECLARE    [queue, options, temporary?]                     queue declared; a 3rd item true: temporary
                                                            (replay drops it: no connection survives)
DELETE     queue                                            queue deleted with its messages
PURGE      queue                                            ready and delayed messages dropped
PAUSE      [queue, paused]                                  delivery paused or resumed
MESSAGE    message                                          compaction rewrote a live message forward
COUNTERS   {queue: [published, delivered, acked, nacked,    compaction: the queues' counters, absolute
            redelivered, expired, dead_lettered, rejected]}
RESULT     [task id, state, value, meta, expires, ts,       a task's result; acks seq in the same record
            acked seq | null]
FORGET     task id                                          a result was forgotten
SCHED_PUT  [name, spec, created]                            a schedule entry was put
SCHED_REMOVE name                                           ... removed
SCHED_PAUSE [name, paused, at]                              ... paused or resumed
SCHED_TICK [name, tick, message | null]                     a tick fired (with its message) or was skipped
SCHED_STATE [name, last tick, fired, paused]                compaction: an entry's progress
REVOKE     [[[task id, until], ...], terminate]             task ids revoked until a time
CHORD      [chord id, [member ids], body spec, error spec]  a chord barrier was declared
CHORD_MEMBER [chord id, member, [state, value, meta]]       compaction: a member's counted result
CHORD_FIRE [chord id, ok, message | null]                   the barrier completed: body (or error) published
CHORD_ADD  [chord id, [member ids]]                         a waiting chord grew (CHORD_ADD); compaction
                                                            folds the added ids into the CHORD record
CHORD_RUN  [chord id, run, [member ids], body spec,         a chord declared with a run (CHORD field 6): a
            error spec]                                     waiting run of it is dropped, and only results
                                                            stored after this record count; members null
                                                            (compaction): the run that fired last (type 34)
BIND       [exchange, type, queue, key]                     a lasting binding was made (temporary ones
                                                            are never logged)
UNBIND     [exchange, queue, key]                           ... removed (a DELETE of the queue removes
                                                            its bindings too)
UNIQUE     [key, task id, until, expires, taken]            a unique key was taken (also compaction)
UNIQUE_FREE key                                             ... freed by its task's start or finish
                                                            (an expiry is not logged: replay knows the time)
RATE       [kind ("task" | "queue"), name, limit | null]    a rate limit set live (RATE_LIMIT); null lifts it
EPOCH      [epoch, start lsn]                               a leadership term began at start lsn (written
                                                            at promotion; compaction rewrites the kept
                                                            terms with their original start lsns)
PUBLISH_FRAME [seq, ts, frame bytes]                      a whole PUBLISH_BATCH frame of plain publishes
                                                            was accepted: its bytes as received (protocol.md
                                                            §5.46, ``[46, rid, [[queue, body, id, priority,
                                                            options], ...]]``, every options null or
                                                            {"dedupe": key}); item 0 is the message at seq
                                                            (this record's lsn), published at ts
PUBLISH_NEXT k                                              item k >= 1 of the PUBLISH_FRAME at this lsn - k:
                                                            the message whose seq is this lsn (written with
                                                            its frame, in one batch: never apart)
CHECKPOINT ["begin", [[dedupe key, message id, at], ...]]   a checkpoint of the whole state begins here
           ["block", queue, priority, seqs, ts, lsns|null]  ... one Packed block of ready messages: three
                                                            byte strings, 8 bytes per message each
                                                            (little-endian i64 seq, f64 publish time,
                                                            i64 lsn of the record holding its id and body;
                                                            null: the lsn is the seq)
                                                            (type 33; see replay.py "Checkpoints")
"""

PUBLISH = 1
DELIVER = 2
ACK = 3
REQUEUE = 4
DEAD = 5
MOVE = 6
DROP = 7
EXPIRE = 8
DECLARE = 9
DELETE = 10
PURGE = 11
PAUSE = 12
MESSAGE = 13
COUNTERS = 14
RESULT = 15
FORGET = 16
SCHED_PUT = 17
SCHED_REMOVE = 18
SCHED_PAUSE = 19
SCHED_TICK = 20
SCHED_STATE = 21
REVOKE = 22
CHORD = 23
CHORD_MEMBER = 24
CHORD_FIRE = 25
BIND = 26
UNBIND = 27
UNIQUE = 28
UNIQUE_FREE = 29
RATE = 30
EPOCH = 31
CHORD_ADD = 32
CHECKPOINT = 33
CHORD_RUN = 34
PUBLISH_FRAME = 35
PUBLISH_NEXT = 36

NAMES = {
    PUBLISH: "PUBLISH", DELIVER: "DELIVER", ACK: "ACK", REQUEUE: "REQUEUE", DEAD: "DEAD",
    MOVE: "MOVE", DROP: "DROP", EXPIRE: "EXPIRE", DECLARE: "DECLARE", DELETE: "DELETE",
    PURGE: "PURGE", PAUSE: "PAUSE", MESSAGE: "MESSAGE", COUNTERS: "COUNTERS",
    RESULT: "RESULT", FORGET: "FORGET", SCHED_PUT: "SCHED_PUT", SCHED_REMOVE: "SCHED_REMOVE",
    SCHED_PAUSE: "SCHED_PAUSE", SCHED_TICK: "SCHED_TICK", SCHED_STATE: "SCHED_STATE", REVOKE: "REVOKE",
    CHORD: "CHORD", CHORD_MEMBER: "CHORD_MEMBER", CHORD_FIRE: "CHORD_FIRE",
    BIND: "BIND", UNBIND: "UNBIND", UNIQUE: "UNIQUE", UNIQUE_FREE: "UNIQUE_FREE",
    RATE: "RATE", EPOCH: "EPOCH", CHORD_ADD: "CHORD_ADD", CHECKPOINT: "CHECKPOINT", CHORD_RUN: "CHORD_RUN",
    PUBLISH_FRAME: "PUBLISH_FRAME", PUBLISH_NEXT: "PUBLISH_NEXT",
}

COUNTER_FIELDS = (
    "published", "delivered", "acked", "nacked", "redelivered", "expired", "dead_lettered", "rejected",
)


def message_payload(msg) -> list:
    """Everything needed to rebuild a message: [seq, queue, id, body, priority,
    headers, attempts, ready_at, expires, ts]."""
    return [
        msg.seq, msg.queue.name, msg.id, msg.body, msg.priority,
        msg.headers, msg.attempts, msg.ready_at, msg.expires, msg.ts,
    ]
