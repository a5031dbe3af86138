#!/usr/bin/env python3
"""Hostile local clients of the control socket, for hostile_clients.rs.

Started as root; takes on --uid/--gid/--groups (setgroups, setgid, setuid)
before anything else, so the agent sees exactly those kernel credentials.
Speaks raw HTTP/2 (no h2 library needed): literal HPACK headers, no
Huffman coding.

Modes:
  flood SOCKET SECONDS CONNS STREAMS SIZE   streams each announcing a SIZE
      message and sending all but its last byte, on CONNS parallel
      connections, reconnecting until SECONDS passed
  idle SOCKET SECONDS COUNT                  COUNT connections that send
      nothing; closed ones are reopened until SECONDS passed
  stall_watch SOCKET                         a Watch call whose client never
      reads; prints "watching" once the request is sent, then sleeps
  run -- ARGV...                             exec ARGV
"""

import os
import resource
import select
import socket
import struct
import sys
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def headers_block(path):
    block = b""
    for name, value in [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]:
        block += b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value
    return block


def settings(pairs):
    return frame(4, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def connect(path, timeout=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


class Conn:
    """One HTTP/2 connection that keeps to flow control (so a correct
    server must accept what it sends): a reader thread acknowledges
    SETTINGS and tracks the windows the server grants."""

    def __init__(self, path):
        self.sock = connect(path)
        self.lock = threading.Condition()
        self.conn_window = 65535
        self.initial = 65535
        self.streams = {}
        self.reset = set()
        self.closed = False
        self.wlock = threading.Lock()
        self.send(PREFACE + settings([]))
        threading.Thread(target=self.read, daemon=True).start()

    def send(self, data):
        with self.wlock:
            self.sock.sendall(data)

    def read(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags = buf[3], buf[4]
                    sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    payload = buf[9 : 9 + length]
                    buf = buf[9 + length :]
                    self.on_frame(kind, flags, sid, payload)
        except OSError:
            pass
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def on_frame(self, kind, flags, sid, payload):
        with self.lock:
            if kind == 4 and not flags & 1:  # SETTINGS
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[i : i + 6])
                    if key == 4:
                        delta = value - self.initial
                        self.initial = value
                        for k in self.streams:
                            self.streams[k] += delta
                threading.Thread(target=self.send, args=(frame(4, 1, 0),), daemon=True).start()
            elif kind == 8:  # WINDOW_UPDATE
                inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                elif sid in self.streams:
                    self.streams[sid] += inc
            elif kind == 3 or (kind == 1 and flags & 1):  # RST_STREAM, or a response that ended
                self.reset.add(sid)
            elif kind == 7:  # GOAWAY
                self.closed = True
            elif kind == 6 and not flags & 1:  # PING
                threading.Thread(target=self.send, args=(frame(6, 1, 0, payload),), daemon=True).start()
            self.lock.notify_all()

    def open(self, sid, path):
        with self.lock:
            self.streams[sid] = self.initial
        self.send(frame(1, 0x4, sid, headers_block(path)))

    def take(self, sid, want, wait):
        """Up to want bytes of window for sid, waiting up to wait seconds."""
        end = time.time() + wait
        with self.lock:
            while True:
                if self.closed or sid in self.reset:
                    return -1
                n = min(want, self.conn_window, self.streams[sid], 16384)
                if n > 0:
                    self.conn_window -= n
                    self.streams[sid] -= n
                    return n
                left = end - time.time()
                if left <= 0:
                    return 0
                self.lock.wait(left)


def flood_one(path, deadline, streams, size):
    while time.time() < deadline:
        try:
            c = Conn(path)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            for i in range(streams):
                if time.time() >= deadline or c.closed:
                    break
                sid = 1 + 2 * i
                c.open(sid, "/certctl.agent.v1.Agent/Deploy")
                # The 5-byte gRPC prefix announces size bytes; all but the
                # last one follow, as far as the windows allow.
                pending = b"\x00" + struct.pack(">I", size)
                left = size - 1
                while pending or left > 0:
                    want = len(pending) if pending else left
                    n = c.take(sid, want, 0.5)
                    if n <= 0:
                        break
                    if pending:
                        c.send(frame(0, 0, sid, pending[:n]))
                        pending = pending[n:]
                    else:
                        c.send(frame(0, 0, sid, bytes(n)))
                        left -= n
            # Hold what was sent until the server gives up on it.
            with c.lock:
                while not c.closed and time.time() < deadline:
                    c.lock.wait(0.5)
        except OSError:
            pass
        finally:
            c.sock.close()


def flood(path, seconds, conns, streams, size):
    deadline = time.time() + seconds
    threads = [
        threading.Thread(target=flood_one, args=(path, deadline, streams, size))
        for _ in range(conns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def idle(path, seconds, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    deadline = time.time() + seconds
    socks = {}
    poller = select.poll()
    while time.time() < deadline:
        while len(socks) < count and time.time() < deadline:
            try:
                s = connect(path, timeout=1.0)
            except OSError:
                time.sleep(0.01)
                break
            s.setblocking(False)
            socks[s.fileno()] = s
            poller.register(s, select.POLLIN)
        for fd, _ in poller.poll(200):
            s = socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del socks[fd]
                s.close()
    print("open at the end:", len(socks), flush=True)


def stall_watch(path):
    s = connect(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Huge windows: the agent may send as much as it likes; we never read.
    s.sendall(
        PREFACE
        + settings([(4, 0x7FFFFFFF)])
        + frame(8, 0, 0, struct.pack(">I", 0x7FFFFFFF - 65535))
        + frame(1, 0x4, 1, headers_block("/certctl.agent.v1.Agent/Watch"))
        + frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00")
    )
    print("watching", flush=True)
    while True:
        time.sleep(3600)


def main():
    args = sys.argv[1:]
    uid = gid = None
    groups = []
    while args and args[0].startswith("--"):
        opt, value = args[0], args[1]
        args = args[2:]
        if opt == "--uid":
            uid = int(value)
        elif opt == "--gid":
            gid = int(value)
        elif opt == "--groups":
            groups = [int(g) for g in value.split(",") if g]
    if gid is not None:
        os.setgroups(groups)
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    mode = args[0]
    if mode == "flood":
        flood(args[1], float(args[2]), int(args[3]), int(args[4]), int(args[5]))
    elif mode == "idle":
        idle(args[1], float(args[2]), int(args[3]))
    elif mode == "stall_watch":
        stall_watch(args[1])
    elif mode == "run":
        argv = args[2:] if args[1] == "--" else args[1:]
        os.execv(argv[0], argv)
    else:
        sys.exit("unknown mode " + mode)


main()
