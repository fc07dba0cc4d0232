"""A pgwatch subscriber: keeps an exact mirror of one watched table by docs/protocol.md (version 1).

The reference for clients in other languages (class Mirror), and a command for the test suite:
`python3 pgwatch_subscriber.py CONNINFO CHANNEL` mirrors the table watched on CHANNEL and reads
commands on stdin, one a line: `dump` prints {"rows": [...], "resets": N, "last_seq": L,
"ignored": N} as one line, `quit` (or end of input) exits. Diagnostics go to stderr. psycopg >= 3.1.
"""
import json, os, random, select, sys, time
from collections import deque
from decimal import Decimal

import psycopg
from psycopg import errors, sql

PROTOCOL = 1
BOOL = 16
NUMBERS = {20, 21, 23, 26, 700, 701, 1700}  # int8, int2, int4, oid, float4, float8, numeric


def snapshot_value(text, typ):
    """A column's value as payloads carry it, from its text output and (base) type oid."""
    if text is None:
        return None
    text = text.decode()
    if typ == BOOL:
        return text == "t"
    if typ in NUMBERS and text.lstrip("-")[:1].isdigit():  # NaN and infinities stay strings
        return json.loads(text, parse_float=Decimal)
    return text


def json_value(value):
    # A Decimal is written as its own text: numbers round-trip exactly.
    return str(value) if isinstance(value, Decimal) else json.dumps(value)


class Mirror:
    """The rows of the table watched on `channel`, kept up to date by run(), which also calls
    fds[fd]() whenever file descriptor fd is readable (while reconnecting too)."""

    def __init__(self, conninfo, channel, fds=None):
        self.conninfo, self.channel, self.fds = conninfo, channel, fds or {}
        self.rows = {}  # key values (a tuple) -> row (column -> value)
        self.last = None  # L, the seq of the last payload applied
        self.retained = False  # as found by the last refetch: the watch retains, position() answers
        self.resets = self.ignored = 0
        self.applied = {}  # seq -> text of the payloads applied lately, to spot forged ones
        self.pending = deque()  # payloads received and not yet handled, in order
        self.conn = None

    def run(self):
        """Mirrors forever; reconnects after any connection error (and 55000: not ready yet)."""
        delay = 0.05
        while True:
            try:
                self._connect()
                delay = 0.05
                self._follow()
            except psycopg.OperationalError as e:
                print(f"pgwatch-python: {e}".strip(), file=sys.stderr)
                if self.conn:
                    self.conn.close()
                # Exponential backoff with jitter, so that many clients do not come back at once.
                self._wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)

    def dump(self):
        """The mirror as one line of JSON, rows sorted by key."""
        rows = ",".join("{%s}" % ",".join(f"{json.dumps(c)}:{json_value(v)}" for c, v in row.items())
                        for _, row in sorted(self.rows.items(), key=lambda item: item[0]))
        return '{"rows":[%s],"resets":%d,"last_seq":%s,"ignored":%d}' % (
            rows, self.resets, json.dumps(self.last), self.ignored)

    def _connect(self):
        # Keepalives and a user timeout: a dead peer fails the health check's SELECT 1.
        self.conn = psycopg.connect(self.conninfo, autocommit=True, application_name="pgwatch-python",
                                    client_encoding="utf8", connect_timeout=5, keepalives_idle=5,
                                    keepalives_interval=2, keepalives_count=3, tcp_user_timeout=10000)
        # psycopg hands the notifications it reads during a query to handlers only: queue them.
        self.conn.add_notify_handler(lambda n: self.pending.append(n.payload))
        if self.conn.execute("SELECT pgwatch.protocol_version()").fetchone()[0] != PROTOCOL:
            sys.exit("pgwatch-python: the server speaks another protocol version")
        watch = self.conn.execute("SELECT tbl::text, key_columns, extra_columns, retain IS NOT NULL"
                                  " FROM pgwatch.watches WHERE channel = %s", (self.channel,)).fetchone()
        if watch is None:
            sys.exit(f"pgwatch-python: no watch on channel {self.channel}")
        self.table, self.keys, extra, self.watch_retained = watch
        self.cols = self.keys + extra
        self.pending.clear()  # the last connection's: the replay or refetch below covers them
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        if self.retained and self.last is not None:
            self._replay()
        else:
            self._refetch()

    def _follow(self):
        """Handles payloads as they come; checks the connection when nothing came for 5 s."""
        heard = time.monotonic()
        while True:
            while self.pending:
                self._on_payload(self.pending.popleft())
            if self._wait(1.0, self.conn.fileno()):
                self.conn.pgconn.consume_input()  # raises when the connection is gone
                while (n := self.conn.pgconn.notifies()) is not None:
                    self.pending.append(n.extra.decode())
                heard = time.monotonic()
            elif time.monotonic() - heard > 5:
                self.conn.execute("SELECT 1")
                heard = time.monotonic()

    def _wait(self, timeout, sock=None):
        """Waits up to `timeout` s, serving self.fds; True as soon as `sock` is readable."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready = select.select([*self.fds, *([] if sock is None else [sock])], [], [], left)[0]
            for fd in ready:
                if fd in self.fds:
                    self.fds[fd]()
            if sock in ready:
                return True
        return False

    def _on_payload(self, text):
        """Applies a notified payload by the rules on sequence numbers and distrust."""
        try:
            seq, op, rows = self._parse(text)
        except (ValueError, LookupError, TypeError, AttributeError):
            self.ignored += 1  # anyone can NOTIFY anything
            return
        if not self.retained:
            if rows is None or (seq is not None and self.last is not None and seq != self.last + 1):
                self._refetch()  # asked to, missed some, or the server restarted (seq from 1)
            else:
                self._apply(seq, op, rows, text)
        elif seq is None:
            self._refetch()  # notified inline, outside the log
        elif seq <= self.last:
            # Applied already; if another text came with this seq, the log tells which was real.
            if self.applied.get(seq, text) != text and self._log(seq - 1, 1) != [(seq, self.applied[seq])]:
                self._refetch()
        elif seq > self.last + 1 or rows is None:
            self._replay()  # a gap, or a marker: the log holds only what the server sent
        else:
            self._apply(seq, op, rows, text)

    def _parse(self, text):
        """(seq, op, rows) of a payload; rows is None when it asks for a refetch."""
        p = json.loads(text, parse_float=Decimal)
        op, seq = p["op"], p.get("seq")
        if seq is not None and type(seq) is not int:
            raise ValueError("seq")
        if op in ("resync", "reset") or p.get("overflow") is True:
            return seq, op, None
        if op not in ("insert", "update", "delete", "truncate"):
            raise ValueError(op)
        rows = []
        for row in p.get("rows", []):
            if "cols" in p:  # compact: values in cols order, then maybe {"old":[...]} or {"partial":true}
                flags = row.pop() if isinstance(row[-1], dict) else {}
                row = {**dict(zip(p["cols"], row)), **flags}
            if row.get("partial") is True:
                return seq, op, None  # keys only: fetching the whole table is the simple way
            row = {c: row[c] for c in self.cols}  # skips "old" and members we do not know
            if any(isinstance(v, (dict, list)) for v in row.values()):
                raise ValueError("not a value")
            rows.append(row)
        return seq, op, rows

    def _apply(self, seq, op, rows, text):
        if op == "truncate":
            self.rows.clear()
        for row in rows:
            key = tuple(row[c] for c in self.keys)
            if op == "delete":
                self.rows.pop(key, None)
            else:
                self.rows[key] = row
        if seq is not None:
            self.last = seq
            self.applied[seq] = text
            self.applied.pop(seq - 1000, None)  # a feed's seqs are consecutive: keeps the last 1000

    def _log(self, after, limit=1000):
        """[(seq, payload)] the log holds after `after`; None when it no longer holds after + 1."""
        try:
            return self.conn.execute("SELECT seq, payload FROM pgwatch.replay(%s, %s, %s)",
                                     (self.channel, after, limit)).fetchall()
        except errors.SnapshotTooOld:
            return None

    def _replay(self):
        """Applies what the log holds after L, page by page; refetches if it lost L + 1."""
        while got := self._log(self.last):
            for seq, text in got:
                _, op, rows = self._parse(text)
                if rows is None:
                    return self._refetch()
                self._apply(seq, op, rows, text)
        if got is None:
            self._refetch()

    def _refetch(self):
        """Start-up from step 4: the position, then a snapshot that replaces the mirror."""
        self.pending.clear()  # received before the snapshot, whose rows hold their changes
        self.applied.clear()
        self.retained, self.last = self.watch_retained, None
        if self.retained:
            try:
                self.last = self.conn.execute("SELECT pgwatch.position(%s)", (self.channel,)).fetchone()[0]
            except errors.InsufficientPrivilege:
                self.retained = False  # this role may not replay the table
        columns = sql.SQL(", ").join(map(sql.Identifier, self.cols))
        # The values' text output and type (a domain's base type): what payloads are made of.
        res = self.conn.execute(sql.SQL("SELECT {} FROM {}").format(columns, sql.SQL(self.table))).pgresult
        types = [res.ftype(i) for i in range(res.nfields)]
        rows = ({c: snapshot_value(res.get_value(r, i), types[i]) for i, c in enumerate(self.cols)}
                for r in range(res.ntuples))
        self.rows = {tuple(row[c] for c in self.keys): row for row in rows}
        self.resets += 1


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: pgwatch_subscriber.py CONNINFO CHANNEL")
    buffer = b""

    def command():
        # os.read, not sys.stdin: a buffered reader could hold lines that select does not see.
        nonlocal buffer
        buffer += os.read(0, 4096) or b"\nquit\n"  # end of input: quit after the last command
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip() == b"dump":
                print(mirror.dump(), flush=True)
            elif line.strip() == b"quit":
                sys.exit(0)
            elif line.strip():
                print(f"pgwatch-python: unknown command {line!r}", file=sys.stderr)

    mirror = Mirror(sys.argv[1], sys.argv[2], {0: command})
    mirror.run()


if __name__ == "__main__":
    main()
