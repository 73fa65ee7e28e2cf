#!/usr/bin/env python3
"""Accept latency probe: sends COUNT messages of SIZE octets over one SMTP session
to HOST:PORT and times each from the end of the data (".") to the 250 reply.
Prints: p50_ms p99_ms max_ms count. Runs alongside a load generator."""
import smtplib, sys, time

host, port = sys.argv[1], int(sys.argv[2])
count, size = int(sys.argv[3]), int(sys.argv[4])
rcpt = sys.argv[5] if len(sys.argv) > 5 else "u@c.test"
body = ("Subject: latency probe\r\n\r\n" + ("x" * 76 + "\r\n") * (size // 78)).encode()
times = []
s = smtplib.SMTP(host, port, timeout=60)
s.ehlo("probe.test")
for i in range(count):
    s.mail("probe@x.test")
    s.rcpt(rcpt)
    code, _ = s.docmd("DATA")
    assert code == 354, code
    s.send(body + b".\r\n")
    t0 = time.perf_counter()
    code, msg = s.getreply()
    times.append((time.perf_counter() - t0) * 1000)
    assert code == 250, (code, msg)
s.quit()
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"{pick(0.5):.2f} {pick(0.99):.2f} {times[-1]:.2f} {len(times)}")
