'use strict';
const { createRequire } = require('module');
const serverMain = process.argv.splice(2, 1)[0];
const serverRequire = createRequire(serverMain);
const memoryRequire = createRequire(serverRequire.resolve('pouchdb-adapter-memory'));
const coreRequire = createRequire(memoryRequire.resolve('pouchdb-adapter-leveldb-core'));
const adapterUtils = coreRequire('pouchdb-adapter-utils');
const utilsMerge = createRequire(coreRequire.resolve('pouchdb-adapter-utils'))('pouchdb-merge');
const pouchRequire = createRequire(serverRequire.resolve('pouchdb-core'));
const PouchDB = pouchRequire('pouchdb-core');
const { adapterFun } = pouchRequire('pouchdb-utils');
const merge = pouchRequire('pouchdb-merge');
const { traverseRevTree } = merge;
const expressRequire = createRequire(serverRequire.resolve('express-pouchdb'));
const cleanFilename = expressRequire('./clean-filename');

// The hooks below replace these functions; fail loudly if a dependency changed shape.
for (const [module, name] of [[adapterUtils, 'processDocs'], [utilsMerge, 'merge'],
                              [utilsMerge, 'revExists'], [merge, 'isDeleted'],
                              [merge, 'traverseRevTree'], [PouchDB.prototype, 'revsDiff']]) {
  if (typeof module[name] !== 'function') {
    throw new Error('pouchdb-server launcher: ' + name + ' is not where it is expected');
  }
}

const DEFAULT_REVS_LIMIT = 1000;
const limits = new Map();  // database name -> revs_limit

// Whether a revision (by default the winner) is a tombstone, found by generation and hash.
function isDeleted(metadata, rev) {
  rev = rev || merge.winningRev(metadata);
  const pos = parseInt(rev, 10);
  const hash = rev.slice(rev.indexOf('-') + 1);
  let deleted = false;
  traverseRevTree(metadata.rev_tree, (isLeaf, nodePos, nodeHash, ctx, opts) => {
    if (nodePos === pos && nodeHash === hash) { deleted = Boolean(opts.deleted); }
  });
  return deleted;
}
for (const module of [merge, utilsMerge, adapterUtils]) { module.isDeleted = isDeleted; }

// CouchDB's revision tree merge (couch_key_tree), in place of PouchDB's. A tree is held as
// nodes keyed by rev, each with its parent (null at a root: generation 1, or the oldest kept
// after stemming); a delivered path links its revisions into that graph, so a stemmed root
// regains its parent and overlapping trees join, whatever order the paths come in. Stemming
// keeps at most `limit` revisions on each leaf's path.
function toNodes(revTree) {
  const nodes = new Map();
  traverseRevTree(revTree, (isLeaf, pos, hash, parent, opts) => {
    const rev = pos + '-' + hash;
    nodes.set(rev, { pos, hash, parent: parent || null, opts });
    return rev;
  });
  return nodes;
}

function leavesOf(nodes) {
  const parents = new Set([...nodes.values()].map((node) => node.parent));
  return [...nodes.keys()].filter((rev) => !parents.has(rev));
}

function stemNodes(nodes, limit) {
  const budget = new Map();  // rev -> how many revisions its best leaf path still keeps
  for (const leaf of leavesOf(nodes)) {
    let rev = leaf;
    for (let left = limit; rev !== null && left > 0 && (budget.get(rev) || 0) < left; left--) {
      budget.set(rev, left);
      rev = nodes.get(rev).parent;
    }
  }
  const removed = [...nodes.keys()].filter((rev) => !budget.has(rev));
  for (const rev of removed) { nodes.delete(rev); }
  for (const node of nodes.values()) {
    if (node.parent !== null && !nodes.has(node.parent)) { node.parent = null; }
  }
  return removed;
}

function toRevTree(nodes) {
  const children = new Map();
  const roots = [];
  for (const [rev, node] of nodes) {
    if (node.parent === null) { roots.push(rev); continue; }
    if (!children.has(node.parent)) { children.set(node.parent, []); }
    children.get(node.parent).push(rev);
  }
  const byHash = (a, b) => (nodes.get(a).hash < nodes.get(b).hash ? -1 : 1);
  const build = (rev) => {
    const node = nodes.get(rev);
    return [node.hash, node.opts, (children.get(rev) || []).sort(byHash).map(build)];
  };
  roots.sort((a, b) => nodes.get(a).pos - nodes.get(b).pos || byHash(a, b));
  return roots.map((rev) => ({ pos: nodes.get(rev).pos, ids: build(rev) }));
}

function shapeOf(nodes) {
  return [...nodes].map(([rev, node]) => rev + '<' + node.parent).sort().join(' ');
}

const unchangedTrees = new WeakSet();  // merge results that are the tree as it was

utilsMerge.merge = function (revTree, pathTree, limit) {
  const nodes = toNodes(revTree);
  const before = shapeOf(nodes);
  const leavesBefore = new Set(leavesOf(nodes));
  let conflicts = null;  // how PouchDB's update checks see the first new revision
  for (const [rev, node] of toNodes([pathTree])) {  // oldest first
    const known = nodes.get(rev);
    if (known === undefined) {
      nodes.set(rev, { ...node });
      conflicts = conflicts || (leavesBefore.has(node.parent) ? 'new_leaf' : 'new_branch');
    } else if (known.parent === null && node.parent !== null) {
      known.parent = node.parent;  // a stemmed or partial root regains its history
    }
  }
  const stemmedRevs = stemNodes(nodes, limit || DEFAULT_REVS_LIMIT);
  const tree = toRevTree(nodes);
  if (shapeOf(nodes) === before) {  // nothing new, or all of it stemmed away again
    unchangedTrees.add(tree);
    return { tree, stemmedRevs: [], conflicts: 'internal_node' };
  }
  return { tree, stemmedRevs, conflicts: conflicts || 'new_branch' };
};

// PouchDB skips a replicated revision it already knows without merging the history that
// came with it; CouchDB merges it (a known root may gain its parent). `revExists` is only
// asked for that shortcut: always merge, and let the merge say whether anything changed.
utilsMerge.revExists = () => false;

// Every write goes through processDocs: apply the database's revs_limit, and write nothing
// for a doc whose merge left its tree as it was.
const processDocs = adapterUtils.processDocs;
adapterUtils.processDocs = function (revLimit, docInfos, db, fetched, tx, results, writeDoc,
                                     opts, ...rest) {
  const write = function (docInfo, winningRev, winnerDeleted, revDeleted, isUpdate, delta,
                          index, callback) {
    if (isUpdate && unchangedTrees.has(docInfo.metadata.rev_tree)) {
      results[index] = docInfo;  // as PouchDB answers for a known revision
      return callback();
    }
    return writeDoc.apply(this, arguments);
  };
  return processDocs.call(this, limits.get(db.name) || revLimit, docInfos, db, fetched, tx,
                          results, write, opts, ...rest);
};

// CouchDB's _revs_diff: missing = not in the revision tree; possible ancestors = the leaves
// of a lower generation than some missing revision (the key left out when there are none).
PouchDB.prototype.revsDiff = adapterFun('revsDiff', function (request, opts, callback) {
  if (typeof opts === 'function') { callback = opts; }
  const ids = Object.keys(request);
  Promise.all(ids.map((id) => new Promise((resolve) => {
    this._getRevisionTree(id, (err, tree) => resolve(err ? [] : tree));
  }))).then((trees) => {
    const answer = {};
    ids.forEach((id, i) => {
      const known = new Set();
      const leaves = [];
      traverseRevTree(trees[i], (isLeaf, pos, hash) => {
        known.add(pos + '-' + hash);
        if (isLeaf) { leaves.push({ rev: pos + '-' + hash, pos: pos }); }
      });
      const missing = [...new Set(request[id])].filter((rev) => !known.has(rev));
      if (missing.length) {
        const top = Math.max(...missing.map((rev) => parseInt(rev, 10)));
        const ancestors = leaves.filter((leaf) => leaf.pos < top).map((leaf) => leaf.rev);
        answer[id] = ancestors.length ? { missing, possible_ancestors: ancestors } : { missing };
      }
    });
    callback(null, answer);
  }, callback);
});

// CouchDB's `GET /{db}/_local_docs` (since 2.0), which pouchdb-server lacks: the launcher
// counts each database's local docs as the LevelDB adapter writes and removes them (the
// server is in memory, so they live no longer than this process) and lists them by id.
const localIds = new Map();  // database name -> Set of local doc ids ('_local/...')
const coreLevelPath = coreRequire.resolve('pouchdb-adapter-leveldb-core');
const CoreLevelPouch = require(coreLevelPath);
if (typeof CoreLevelPouch !== 'function') {
  throw new Error('pouchdb-server launcher: pouchdb-adapter-leveldb-core is not a function');
}
function idsOf(name) {
  if (!localIds.has(name)) { localIds.set(name, new Set()); }
  return localIds.get(name);
}
function CountingLevelPouch(opts, callback) {
  CoreLevelPouch.call(this, opts, callback);
  const api = this;  // keyed by its name as the server's routes see it (no path prefix)
  const { _putLocalNoLock: put, _removeLocalNoLock: remove, _destroy: destroy } = api;
  for (const [method, what] of [[put, 'put'], [remove, 'remove'], [destroy, 'destroy']]) {
    if (typeof method !== 'function') {
      throw new Error('pouchdb-server launcher: the adapter has no ' + what + ' to count');
    }
  }
  api._putLocalNoLock = function (doc, options, cb) {
    const id = doc._id;
    return put.call(this, doc, options, (err, res) => {
      if (!err) { idsOf(api.name).add(id); }
      cb(err, res);
    });
  };
  api._removeLocalNoLock = function (doc, options, cb) {
    const id = doc._id;
    return remove.call(this, doc, options, (err, res) => {
      if (!err) { idsOf(api.name).delete(id); }
      cb(err, res);
    });
  };
  api._destroy = function (options, cb) {
    localIds.delete(api.name);
    return destroy.call(this, options, cb);
  };
}
Object.assign(CountingLevelPouch, CoreLevelPouch);
require.cache[coreLevelPath].exports = CountingLevelPouch;

// express-pouchdb has parsed each query value as JSON already.
function param(req, names) {
  return names.map((name) => req.query[name]).find((value) => value !== undefined);
}

const dbRoutesPath = expressRequire.resolve('./routes/db');
const dbRoutes = expressRequire(dbRoutesPath);
require.cache[dbRoutesPath].exports = function (app) {
  // A database made anew starts with the default limit.
  app.put('/:db', (req, res, next) => { limits.delete(cleanFilename(req.params.db)); next(); });
  dbRoutes(app);  // from here on req.db is set (or the answer was 404)
  app.get('/:db/_local_docs', (req, res) => {
    const start = param(req, ['startkey', 'start_key']);
    const end = param(req, ['endkey', 'end_key']);
    const limit = Number(param(req, ['limit']) ?? Infinity);
    const skip = Number(param(req, ['skip']) ?? 0);
    if (![start, end].every((key) => key === undefined || typeof key === 'string')
        || !(limit >= 0) || !(skip >= 0)) {
      res.status(400).json({ error: 'bad_request', reason: 'keys are strings, counts >= 0' });
      return;
    }
    const ids = [...idsOf(req.db.name)].sort().filter(
      (id) => (start === undefined || id >= start) && (end === undefined || id <= end),
    ).slice(skip, skip + limit);
    const withDocs = String(param(req, ['include_docs'])) === 'true';
    Promise.all(ids.map((id) => req.db.get(id))).then((docs) => {
      res.json({
        total_rows: null,
        offset: null,
        rows: docs.map((doc) => {
          const row = { id: doc._id, key: doc._id, value: { rev: doc._rev } };
          if (withDocs) { row.doc = doc; }
          return row;
        }),
      });
    }, (err) => res.status(500).json({ error: 'unknown_error', reason: String(err) }));
  });
  app.post('/:db/_local_docs', (req, res) => {  // {"keys": [...]}: one row per key, in order
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      let keys;
      try {
        keys = JSON.parse(body).keys;
      } catch (err) {
        keys = undefined;
      }
      if (!Array.isArray(keys) || !keys.every((key) => typeof key === 'string')) {
        res.status(400).json({ error: 'bad_request', reason: '`keys` must be a list of ids' });
        return;
      }
      const known = idsOf(req.db.name);
      Promise.all(keys.map((key) => (known.has(key) ? req.db.get(key) : null))).then((docs) => {
        res.json({
          total_rows: null,
          offset: null,
          rows: keys.map((key, i) => (docs[i] === null ? { key, error: 'not_found' }
            : { id: key, key, value: { rev: docs[i]._rev } })),
        });
      }, (err) => res.status(500).json({ error: 'unknown_error', reason: String(err) }));
    });
  });
  app.get('/:db/_revs_limit', (req, res) => {
    res.json(limits.get(req.db.name) || DEFAULT_REVS_LIMIT);
  });
  app.put('/:db/_revs_limit', (req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      const limit = Number(body.trim());
      if (!Number.isInteger(limit) || limit < 1) {
        res.status(400).json({
          error: 'bad_request', reason: 'revs_limit must be a positive integer',
        });
        return;
      }
      limits.set(req.db.name, limit);
      res.json({ ok: true });
    });
  });
};

serverRequire(serverMain);
