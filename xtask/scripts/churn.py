import socket, sys, time, os, multiprocessing as mp
def server(port):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port)); l.listen(1024)
    while True:
        s, _ = l.accept(); s.recv(1); s.close()
def client(port, secs, q):
    n = 0; end = time.time() + secs
    while time.time() < end:
        c = socket.create_connection(("127.0.0.1", port)); c.close(); n += 1
    q.put(n)
if __name__ == "__main__":
    secs = float(sys.argv[1]); ports = [47301, 47302]
    ss = [mp.Process(target=server, args=(p,), daemon=True) for p in ports]
    [s.start() for s in ss]; time.sleep(0.3)
    q = mp.Queue(); cs = [mp.Process(target=client, args=(p, secs, q)) for p in ports]
    [c.start() for c in cs]; [c.join() for c in cs]
    total = sum(q.get() for _ in cs)
    print(f"{total/secs:.0f} conn/s")
