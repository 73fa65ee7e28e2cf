"""A mailbox server for the outbound TLS tests: aiosmtpd on 127.0.0.1:PORT,
offering STARTTLS with CERT/KEY when given. Appends one line per stored message
to LOG: "<tls version or plain> <recipients>". Prints "ready" once listening."""
import asyncio, ssl, sys
from aiosmtpd.controller import Controller

port, log = int(sys.argv[1]), sys.argv[2]
cert = sys.argv[3] if len(sys.argv) > 4 else None
key = sys.argv[4] if len(sys.argv) > 4 else None


class Store:
    async def handle_DATA(self, server, session, envelope):
        tls = "plain"
        if session.ssl is not None:
            obj = server.transport.get_extra_info("ssl_object")
            tls = obj.version() if obj is not None else "tls"
        with open(log, "a") as f:
            f.write(f"{tls} {','.join(envelope.rcpt_tos)}\n")
        return "250 2.0.0 stored"


context = None
if cert:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
c = Controller(Store(), hostname="127.0.0.1", port=port, tls_context=context,
               require_starttls=False, server_hostname="mbox.test")
c.start()
print("ready", flush=True)
try:
    sys.stdin.read()
finally:
    c.stop()
