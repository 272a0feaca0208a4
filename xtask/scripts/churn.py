import socket, sys, time, os, multiprocessing as mp
def server(l):
    while True:
        s, _ = l.accept(); s.recv(1); s.close()
def client(port, secs, q):
    n = 0; end = time.time() + secs
    while time.time() < end:
        c = socket.create_connection(("127.0.0.1", port)); c.close(); n += 1
    q.put(n)
if __name__ == "__main__":
    # Listeners on ports the kernel picks, made before the fork: fixed ports could be
    # taken (an earlier load's connections), and a server that failed to bind left the
    # clients dead and this script waiting for them.
    secs = float(sys.argv[1]); ls = []
    for _ in range(2):
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("127.0.0.1", 0)); l.listen(1024); ls.append(l)
    ports = [l.getsockname()[1] for l in ls]
    ss = [mp.Process(target=server, args=(l,), daemon=True) for l in ls]
    [s.start() for s in ss]; time.sleep(0.3)
    q = mp.Queue(); cs = [mp.Process(target=client, args=(p, secs, q)) for p in ports]
    [c.start() for c in cs]; [c.join() for c in cs]
    total = sum(q.get() for _ in cs)
    print(f"{total/secs:.0f} conn/s")
