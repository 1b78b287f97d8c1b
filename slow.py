import socket, time
socks = []
for i in range(300):
    s = socket.create_connection(('127.0.0.1', 18080)); s.sendall(b'GET /sessions/webinars/ev/gen-slow HTTP/1.1\r\nHost: x\r\n'); socks.append(s)
e = socket.create_connection(('127.0.0.1', 18080)); socks.append(e)  # sends nothing
time.sleep(45)
alive = 0
for s in socks:
    s.setblocking(False)
    try:
        d = s.recv(1)
        if d == b'': pass  # closed
        else: alive += 1
    except BlockingIOError:
        alive += 1
    except Exception: pass
print(f'after 45s: {alive} of {len(socks)} partial-header/empty connections still open')
