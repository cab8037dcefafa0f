// Node.js cluster baseline for benchmarks/serve.py: round-robin scheduling, N workers.
//
//   node benchmarks/node/cluster.js [WORKERS] [net|http]
//
// The primary owns the listening socket on 127.0.0.1 (port picked by the kernel),
// accepts, and hands each connection to the next worker over the IPC channel
// (cluster.SCHED_RR, set explicitly). Each worker runs a tiny server:
//   net  (default) -- does what benchmarks/serve_app.py does: read the request head up
//                     to the blank line, write a fixed HTTP/1.1 response, close;
//   http           -- node:http with the same response (a full HTTP parser: slower).
// Both answer with "X-Worker: <pid>". Once every worker listens, the primary prints
// "ready <port> <worker pids...>" on stdout. SIGTERM/SIGINT stop it all.
'use strict';

const cluster = require('node:cluster');
const net = require('node:net');

cluster.schedulingPolicy = cluster.SCHED_RR; // before the first fork

const kind = process.argv[3] === 'http' ? 'http' : 'net';

if (cluster.isPrimary) {
  const n = Math.max(1, Math.min(64, parseInt(process.argv[2] || '2', 10)));
  const pids = [];
  let port = 0;
  for (let i = 0; i < n; i++) {
    const w = cluster.fork({ SOCKSHARE_BENCH_NODE_KIND: kind });
    w.on('message', (m) => {
      if (m && m.listening) {
        pids.push(w.process.pid);
        port = m.port;
        if (pids.length === n) process.stdout.write(`ready ${port} ${pids.join(' ')}\n`);
      }
    });
  }
  cluster.on('exit', (w, code, signal) => {
    if (!stopping) {
      process.stderr.write(`node worker ${w.process.pid} exited (${signal || code})\n`);
      process.exit(1);
    }
  });
  let stopping = false;
  const stop = () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
    setTimeout(() => process.exit(0), 200).unref();
    cluster.disconnect(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const body = 'ok\n';
  const response = Buffer.from(
    'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ' + body.length +
    '\r\nConnection: close\r\nX-Worker: ' + process.pid + '\r\n\r\n' + body);
  const server = process.env.SOCKSHARE_BENCH_NODE_KIND === 'http'
    ? require('node:http').createServer((req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length,
        'Connection': 'close', 'X-Worker': String(process.pid) });
      res.end(body);
    })
    : net.createServer((sock) => {
      let head = '';
      sock.on('data', (chunk) => {
        head += chunk.toString('latin1');
        if (head.includes('\r\n\r\n')) sock.end(response);
      });
      sock.on('error', () => sock.destroy());
    });
  // port 0 under cluster: the primary binds once and every worker shares that port
  server.listen(0, '127.0.0.1', () => {
    process.send({ listening: true, port: server.address().port });
  });
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
  process.on('SIGINT', () => {});
}
