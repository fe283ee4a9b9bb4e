'use strict';
// A PouchDB puppet for tests: a real PouchDB (the npm `pouchdb` package) with one local
// database on disk, driven by JSON lines.
//
//   node pouchdb_client.js POUCHDB_MAIN DB_DIR
//
// POUCHDB_MAIN is the installed `pouchdb` package's main module; DB_DIR is the LevelDB
// directory of the local database (kept across restarts of the puppet).
//
// Each line on stdin is a command {"id": N, "cmd": NAME, ...arguments}; each gets exactly one
// answer line on stdout, {"id": N, "ok": RESULT} or {"id": N, "error": {name, status, ...}}.
// Live replications stream their events as lines without an id:
// {"event": "change"|"paused"|"active"|"denied"|"error"|"complete", "handle": H, "data": ...}.
//
// Commands (RESULT is what PouchDB resolves with):
//   info; put {doc}; get {docId, options}; remove {docId, rev};
//   bulkDocs {docs, options}; allDocs {options}
//   replicate {direction: "from"|"to", url, options}   one-shot: PouchDB's replication result
//                                                      (docs_read, docs_written, doc_write_failures,
//                                                      errors, last_seq...), also when it ended
//                                                      in error (then with "error" set)
//   live {handle, kind: "sync"|"from"|"to", url, options}   starts a live replication;
//                                                      options.back_off_ms: a fixed pause
//                                                      between retries instead of PouchDB's
//                                                      doubling one (up to 10 minutes)
//   cancel {handle}   stops it; answers once PouchDB says it is complete
//   close             closes the database and exits
const PouchDB = require(process.argv[2]);
const dbDir = process.argv[3];
if (!dbDir) {
  process.stderr.write('usage: node pouchdb_client.js POUCHDB_MAIN DB_DIR\n');
  process.exit(2);
}

const db = new PouchDB(dbDir);
const live = new Map();  // handle -> PouchDB's replication object (an event emitter)

function send(message) {
  process.stdout.write(JSON.stringify(message, plain) + '\n');
}

// Errors and the objects PouchDB puts in them, as plain JSON.
function plain(key, value) {
  if (value instanceof Error) {
    const out = {};
    for (const field of ['name', 'status', 'message', 'reason', 'error', 'id', 'docId']) {
      if (value[field] !== undefined) { out[field] = value[field]; }
    }
    return out;
  }
  return value;
}

function remoteDb(url) {
  // skip_setup: never try to create the remote database (a node's databases exist or not).
  return new PouchDB(url, { skip_setup: true });
}

function replicate(direction, url, options) {
  const remote = remoteDb(url);
  return direction === 'from'
    ? PouchDB.replicate(remote, db, options)
    : PouchDB.replicate(db, remote, options);
}

// A one-shot replication's result, whether it completed or failed part way.
function oneShot({ direction, url, options }) {
  return new Promise((resolve) => {
    const replication = replicate(direction, url, { ...(options || {}), live: false });
    replication.on('complete', (info) => resolve(info));
    replication.on('error', (err) => resolve({ ok: false, error: err, ...(err.result || {}) }));
  });
}

function startLive({ handle, kind, url, options }) {
  if (live.has(handle)) { throw Object.assign(new Error('handle in use: ' + handle), { status: 400 }); }
  const { back_off_ms: backOff, ...rest } = options || {};
  const opts = { ...rest, live: true };
  if (backOff !== undefined) {  // a fixed pause between retries (PouchDB's own doubles)
    opts.back_off_function = () => backOff;
  }
  const replication = kind === 'sync'
    ? PouchDB.sync(db, remoteDb(url), opts)
    : replicate(kind, url, opts);
  const entry = { replication, ended: false };
  live.set(handle, entry);
  for (const event of ['change', 'paused', 'active', 'denied', 'error', 'complete']) {
    replication.on(event, (data) => send({ event, handle, data: data === undefined ? null : data }));
  }
  // An error (without retry) or completion ends it: a later cancel has nothing to wait for.
  for (const event of ['error', 'complete']) {
    replication.on(event, () => { entry.ended = true; });
  }
  return { started: handle };
}

function cancel({ handle }) {
  const entry = live.get(handle);
  if (!entry) { throw Object.assign(new Error('no such handle: ' + handle), { status: 404 }); }
  live.delete(handle);
  if (entry.ended) { return { cancelled: handle }; }
  return new Promise((resolve) => {
    entry.replication.on('complete', () => resolve({ cancelled: handle }));
    entry.replication.on('error', () => resolve({ cancelled: handle }));
    entry.replication.cancel();
  });
}

async function close() {
  await Promise.all([...live.keys()].map((handle) => cancel({ handle })));
  await db.close();
  return { closed: true };
}

const commands = {
  info: () => db.info(),
  put: ({ doc }) => db.put(doc),
  get: ({ docId, options }) => db.get(docId, options || {}),
  remove: ({ docId, rev }) => db.remove(docId, rev),
  bulkDocs: ({ docs, options }) => db.bulkDocs(docs, options || {}),
  allDocs: ({ options }) => db.allDocs(options || {}),
  replicate: oneShot,
  live: startLive,
  cancel,
  close,
};

let pending = Promise.resolve();
let buffered = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  buffered += chunk;
  let newline;
  while ((newline = buffered.indexOf('\n')) >= 0) {
    const line = buffered.slice(0, newline);
    buffered = buffered.slice(newline + 1);
    if (line.trim()) { handle(line); }
  }
});
process.stdin.on('end', () => { pending.then(close).then(() => process.exit(0)); });

function handle(line) {
  let message;
  try {
    message = JSON.parse(line);
  } catch (err) {
    send({ id: null, error: { name: 'bad_command', message: 'not JSON: ' + line.slice(0, 200) } });
    return;
  }
  const { id, cmd } = message;
  const command = commands[cmd];
  if (!command) {
    send({ id, error: { name: 'bad_command', message: 'unknown command: ' + cmd } });
    return;
  }
  // Commands run concurrently (a live replication must not hold up a put); answers carry ids.
  const done = Promise.resolve()
    .then(() => command(message))
    .then((ok) => send({ id, ok: ok === undefined ? null : ok }),
          (err) => send({ id, error: plain(null, err instanceof Error ? err : Object.assign(new Error(String(err.message || err)), err)) }));
  if (cmd === 'close') {
    done.then(() => process.exit(0));
  }
  pending = pending.then(() => done);
}
