#!/usr/bin/env node
// A gpu-tasks producer in plain Node.js (>= 18), built only from docs/PROTOCOL.md.
//
// No npm dependencies: xxh64 is implemented with BigInt, and Redis is spoken over a
// bare TCP (or TLS) socket with a minimal RESP2 client. Use it as a module:
//
//   const { Producer } = require("./producer.js");
//   const producer = await Producer.connect("redis://127.0.0.1:6379/0");
//   const sent = await producer.send("gpu_tasks.alloc",
//                                    { entity_id: "user-42", name: "emb", shape: [4] });
//   const meta = await producer.wait(sent.taskId, 30);   // {status, result, ...}
//   producer.close();
//
// or as a CLI (one JSON line on stdout; see README.md and `--help`).
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const tls = require("node:tls");

// ---------------------------------------------------------------------------------------
// xxh64 (seed 0 by default), over the UTF-8 bytes of the entity id. PROTOCOL.md, "Routing".

const MASK64 = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;

function rotl64(x, r) {
  return ((x << r) | (x >> (64n - r))) & MASK64;
}

function round64(acc, input) {
  acc = (acc + input * P2) & MASK64;
  acc = rotl64(acc, 31n);
  return (acc * P1) & MASK64;
}

function mergeRound64(acc, val) {
  acc ^= round64(0n, val);
  return (acc * P1 + P4) & MASK64;
}

/** xxh64 of `bytes` (a Uint8Array or Buffer) as an unsigned 64-bit BigInt. */
function xxh64(bytes, seed = 0n) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const len = bytes.length;
  seed = BigInt(seed) & MASK64;
  let p = 0;
  let h;
  if (len >= 32) {
    let v1 = (seed + P1 + P2) & MASK64;
    let v2 = (seed + P2) & MASK64;
    let v3 = seed;
    let v4 = (seed - P1) & MASK64;
    for (const limit = len - 32; p <= limit; p += 32) {
      v1 = round64(v1, view.getBigUint64(p, true));
      v2 = round64(v2, view.getBigUint64(p + 8, true));
      v3 = round64(v3, view.getBigUint64(p + 16, true));
      v4 = round64(v4, view.getBigUint64(p + 24, true));
    }
    h = (rotl64(v1, 1n) + rotl64(v2, 7n) + rotl64(v3, 12n) + rotl64(v4, 18n)) & MASK64;
    h = mergeRound64(h, v1);
    h = mergeRound64(h, v2);
    h = mergeRound64(h, v3);
    h = mergeRound64(h, v4);
  } else {
    h = (seed + P5) & MASK64;
  }
  h = (h + BigInt(len)) & MASK64;
  for (; p + 8 <= len; p += 8) {
    h ^= round64(0n, view.getBigUint64(p, true));
    h = (rotl64(h, 27n) * P1 + P4) & MASK64;
  }
  if (p + 4 <= len) {
    h ^= (BigInt(view.getUint32(p, true)) * P1) & MASK64;
    h = (rotl64(h, 23n) * P2 + P3) & MASK64;
    p += 4;
  }
  for (; p < len; p += 1) {
    h ^= (BigInt(bytes[p]) * P5) & MASK64;
    h = (rotl64(h, 11n) * P1) & MASK64;
  }
  h ^= h >> 33n;
  h = (h * P2) & MASK64;
  h ^= h >> 29n;
  h = (h * P3) & MASK64;
  h ^= h >> 32n;
  return h;
}

/** 16 lowercase hex digits, as `xxh64_hex` in the routing vectors. */
function xxh64Hex(value) {
  return value.toString(16).padStart(16, "0");
}

// ---------------------------------------------------------------------------------------
// Routing: entity id -> shard -> queue. PROTOCOL.md, "Routing".

class RoutingError extends Error {
  constructor(message) {
    super(message);
    this.name = "RoutingError";
  }
}

const GPU_QUEUE = /^gpu\.([^.@\s]+)\.(0|[1-9][0-9]*)$/;

/** True when `text` has no lone UTF-16 surrogate (so it has a UTF-8 encoding). */
function isWellFormed(text) {
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff) {
      const next = text.charCodeAt(i + 1);
      if (!(next >= 0xdc00 && next <= 0xdfff)) return false;
      i += 1;
    } else if (unit >= 0xdc00 && unit <= 0xdfff) {
      return false;
    }
  }
  return true;
}

/** `entityId` if it can be routed (a non-empty, well-formed string), else RoutingError. */
function validateEntityId(entityId) {
  if (typeof entityId !== "string") {
    throw new RoutingError(
      `entity_id must be a non-empty string, got ${entityId === null ? "null" : typeof entityId}`);
  }
  if (entityId.length === 0) {
    throw new RoutingError("entity_id must be a non-empty string, got ''");
  }
  if (!isWellFormed(entityId)) {
    throw new RoutingError("entity_id must be valid Unicode text (it is hashed as UTF-8): " +
                           "it holds a lone surrogate");
  }
  return entityId;
}

/** The entity's hash: xxh64 of its UTF-8 bytes, seed 0 (a BigInt). */
function entityHash(entityId) {
  return xxh64(Buffer.from(validateEntityId(entityId), "utf8"));
}

/** The entity's shard index: xxh64(utf8(entity_id), seed 0) mod S (a Number). */
function shardIndex(entityId, shardCount) {
  return Number(entityHash(entityId) % BigInt(shardCount));
}

/** A shard's name, which is also its queue's name (and its Redis list's key). */
function shardName(index) {
  return `shard-${index}`;
}

// ---------------------------------------------------------------------------------------
// A minimal RESP2 client: one connection, commands answered in order (pipelining works).

class RedisReplyError extends Error {
  constructor(message) {
    super(message);
    this.name = "RedisReplyError";
  }
}

/** {host, port, db, username, password, tls} of a redis:// or rediss:// URL. */
function parseRedisUrl(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`not a Redis URL: ${url}`);
  }
  if (parsed.protocol !== "redis:" && parsed.protocol !== "rediss:") {
    throw new Error(`not a Redis URL (redis:// or rediss://): ${url}`);
  }
  const path = parsed.pathname.replace(/^\/+/, "");
  const db = path === "" ? Number(parsed.searchParams.get("db") || 0) : Number(path);
  if (!Number.isInteger(db) || db < 0) throw new Error(`bad database number in ${url}`);
  return {
    host: (parsed.hostname || "127.0.0.1").replace(/^\[|\]$/g, ""),
    port: parsed.port ? Number(parsed.port) : 6379,
    db,
    username: decodeURIComponent(parsed.username || ""),
    password: decodeURIComponent(parsed.password || ""),
    tls: parsed.protocol === "rediss:",
  };
}

/** Redacted URL for messages: never print a password. */
function redactUrl(url) {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "<bad url>";
  }
}

function encodeCommand(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg), "utf8");
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

/** One reply from `buf` at `pos`: [value, next position], or null when incomplete. */
function parseReply(buf, pos) {
  if (pos >= buf.length) return null;
  const lineEnd = buf.indexOf("\r\n", pos);
  if (lineEnd < 0) return null;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString("utf8", pos + 1, lineEnd);
  const next = lineEnd + 2;
  switch (type) {
    case "+":
      return [line, next];
    case "-":
      return [new RedisReplyError(line), next];
    case ":":
      return [Number(line), next];
    case "$": {
      const size = Number(line);
      if (size < 0) return [null, next];
      if (buf.length < next + size + 2) return null;
      return [buf.subarray(next, next + size), next + size + 2];
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return [null, next];
      const items = [];
      let at = next;
      for (let i = 0; i < count; i += 1) {
        const item = parseReply(buf, at);
        if (item === null) return null;
        items.push(item[0]);
        at = item[1];
      }
      return [items, at];
    }
    default:
      throw new Error(`unexpected RESP reply type ${JSON.stringify(type)}`);
  }
}

class RedisClient {
  constructor(socket) {
    this.socket = socket;
    this.pending = [];
    this.buffer = Buffer.alloc(0);
    this.closed = false;
    socket.on("data", (chunk) => this._onData(chunk));
    socket.on("error", (err) => this._failAll(err));
    socket.on("close", () => this._failAll(new Error("Redis connection closed")));
  }

  /** Connect, AUTH and SELECT as the URL says. */
  static connect(url, { connectTimeoutMs = 5000 } = {}) {
    const opts = parseRedisUrl(url);
    return new Promise((resolve, reject) => {
      const socket = opts.tls
        ? tls.connect({ host: opts.host, port: opts.port, servername: opts.host })
        : net.connect({ host: opts.host, port: opts.port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`Redis at ${redactUrl(url)} did not answer within ${connectTimeoutMs} ms`));
      }, connectTimeoutMs);
      const onError = (err) => {
        clearTimeout(timer);
        reject(new Error(`cannot connect to Redis at ${redactUrl(url)}: ${err.message}`));
      };
      socket.once("error", onError);
      socket.once(opts.tls ? "secureConnect" : "connect", async () => {
        clearTimeout(timer);
        socket.removeListener("error", onError);
        socket.setNoDelay(true);
        const client = new RedisClient(socket);
        try {
          if (opts.password) {
            await (opts.username
              ? client.command("AUTH", opts.username, opts.password)
              : client.command("AUTH", opts.password));
          }
          if (opts.db) await client.command("SELECT", opts.db);
          resolve(client);
        } catch (err) {
          client.close();
          reject(err);
        }
      });
    });
  }

  /** Send one command; resolves to its reply (bulk strings as Buffers). */
  command(...args) {
    if (this.closed) return Promise.reject(new Error("Redis connection closed"));
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject });
      this.socket.write(encodeCommand(args));
    });
  }

  close() {
    if (!this.closed) {
      this.closed = true;
      this.socket.end();
      this.socket.destroy();
    }
  }

  _onData(chunk) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    let pos = 0;
    for (;;) {
      let reply;
      try {
        reply = parseReply(this.buffer, pos);
      } catch (err) {
        this._failAll(err);
        this.close();
        return;
      }
      if (reply === null) break;
      pos = reply[1];
      const waiter = this.pending.shift();
      if (waiter) {
        if (reply[0] instanceof RedisReplyError) waiter.reject(reply[0]);
        else waiter.resolve(reply[0]);
      }
    }
    this.buffer = this.buffer.subarray(pos);
  }

  _failAll(err) {
    this.closed = true;
    for (const waiter of this.pending.splice(0)) waiter.reject(err);
  }
}

// ---------------------------------------------------------------------------------------
// The shard count S: one read per process, never re-read. PROTOCOL.md, "Where S lives".

const SHARD_MAP_META_KEY = "gpu-tasks:shardmap:meta";
const SHARD_COUNT_FIELD = "shard_count";

async function readShardCount(client) {
  const raw = await client.command("HGET", SHARD_MAP_META_KEY, SHARD_COUNT_FIELD);
  if (raw === null) {
    throw new RoutingError(
      `no shard map in Redis (${SHARD_MAP_META_KEY} has no ${SHARD_COUNT_FIELD}): ` +
      "create one with `gpu-tasks shards init`");
  }
  const count = Number(raw.toString("utf8"));
  if (!Number.isInteger(count) || count < 1) {
    throw new RoutingError(`${SHARD_MAP_META_KEY} ${SHARD_COUNT_FIELD} is not a positive ` +
                           `integer: ${JSON.stringify(raw.toString("utf8"))}`);
  }
  return count;
}

// ---------------------------------------------------------------------------------------
// The Celery protocol-2 message as kombu's Redis transport stores it. PROTOCOL.md,
// "The message".

const REPR_MAX_CHARS = 1024;

function truncate(text, max) {
  return text.length > max ? `${text.slice(0, max - 3)}...` : text;
}

/** {taskId, payload}: the JSON string to LPUSH onto `queue`. */
function buildMessage({ task, kwargs, queue, taskId = crypto.randomUUID(),
                        origin = `node-${process.pid}@${os.hostname()}` }) {
  if (typeof task !== "string" || !task) throw new Error("task must be a non-empty string");
  if (kwargs === null || typeof kwargs !== "object" || Array.isArray(kwargs)) {
    throw new Error("kwargs must be a JSON object");
  }
  const embed = { callbacks: null, errbacks: null, chain: null, chord: null };
  const body = Buffer.from(JSON.stringify([[], kwargs, embed]), "utf8").toString("base64");
  const payload = {
    body,
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "js",
      task,
      id: taskId,
      shadow: null,
      eta: null,
      expires: null,
      group: null,
      group_index: null,
      retries: 0,
      timelimit: [null, null],
      root_id: taskId,
      parent_id: null,
      argsrepr: "()",
      kwargsrepr: truncate(JSON.stringify(kwargs), REPR_MAX_CHARS),
      origin,
      ignore_result: false,
    },
    properties: {
      correlation_id: taskId,
      reply_to: "",
      delivery_mode: 2,
      delivery_info: { exchange: "", routing_key: queue },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: crypto.randomUUID(),
    },
  };
  return { taskId, payload: JSON.stringify(payload) };
}

// ---------------------------------------------------------------------------------------
// Results: celery-task-meta-<task id>. PROTOCOL.md, "Results".

const RESULT_KEY_PREFIX = "celery-task-meta-";
const READY_STATES = new Set(["SUCCESS", "FAILURE", "REVOKED"]);

class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Producer {
  constructor(client) {
    this.client = client;
    this.shardCount = 0;
  }

  static async connect(url, options) {
    return new Producer(await RedisClient.connect(url, options));
  }

  /** S, read from Redis the first time and kept for the life of this producer. */
  async getShardCount() {
    if (!this.shardCount) this.shardCount = await readShardCount(this.client);
    return this.shardCount;
  }

  /** Where a request goes: its entity's shard queue, or the GPU queue given. */
  async queueFor(task, kwargs, queue) {
    if (Object.prototype.hasOwnProperty.call(kwargs, "entity_id")) {
      const index = shardIndex(kwargs.entity_id, await this.getShardCount());
      if (queue && queue !== shardName(index)) {
        throw new RoutingError(`task ${task} for entity ${JSON.stringify(kwargs.entity_id)} ` +
                               `goes to its shard's queue ${shardName(index)}, not ${queue}`);
      }
      return shardName(index);
    }
    if (queue && GPU_QUEUE.test(queue)) return queue;
    throw new RoutingError(
      `task ${task} was sent with neither entity_id (routes it to its shard) nor a GPU queue ` +
      `gpu.<node>.<index>${queue ? ` (${JSON.stringify(queue)} is not one)` : ""}; ` +
      "nothing was enqueued");
  }

  /** Enqueue `task` with `kwargs` (entity_id among them); {taskId, queue}. */
  async send(task, kwargs, { queue, taskId } = {}) {
    const target = await this.queueFor(task, kwargs, queue);
    const message = buildMessage({ task, kwargs, queue: target, taskId });
    await this.client.command("LPUSH", target, message.payload);
    return { taskId: message.taskId, queue: target };
  }

  /** The stored result of `taskId` ({status, result, traceback, ...}), or null if none yet. */
  async result(taskId) {
    const raw = await this.client.command("GET", RESULT_KEY_PREFIX + taskId);
    return raw === null ? null : JSON.parse(raw.toString("utf8"));
  }

  /** Poll until the task's result is stored; TimeoutError after `timeoutS` seconds. */
  async wait(taskId, timeoutS = 30) {
    const deadline = Date.now() + timeoutS * 1000;
    let interval = 20;
    for (;;) {
      const meta = await this.result(taskId);
      if (meta !== null && READY_STATES.has(meta.status)) return meta;
      if (Date.now() >= deadline) {
        throw new TimeoutError(`no result for task ${taskId} within ${timeoutS} s` +
                               (meta ? ` (last status ${meta.status})` : ""));
      }
      await sleep(Math.min(interval, Math.max(1, deadline - Date.now())));
      interval = Math.min(interval * 2, 250);
    }
  }

  close() {
    this.client.close();
  }
}

// ---------------------------------------------------------------------------------------
// CLI

const USAGE = `usage:
  node producer.js --redis-url URL --task NAME (--entity ID | --queue gpu.<node>.<i>)
                   [--kwargs JSON] [--task-id ID] [--wait] [--timeout SECONDS]
  node producer.js --route ENTITY (--shards S | --redis-url URL)
  node producer.js --vectors FILE

Sends one request and prints one JSON line: task_id, task, queue (and entity_id); with
--wait also status and result (SUCCESS) or error {exc_type, exc_message, exc_module}.
--redis-url defaults to $GPU_TASKS_REDIS_URL.
Exit status: 0 sent (or SUCCESS), 1 the task failed, 2 bad usage or routing refused,
3 no result within --timeout, 4 Redis error.`;

const EXIT = { ok: 0, failed: 1, usage: 2, timeout: 3, redis: 4 };

class UsageError extends Error {}

const FLAGS = new Set(["--wait", "--help", "-h"]);

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    if (FLAGS.has(flag)) {
      args[flag.replace(/^-+/, "")] = true;
      continue;
    }
    if (!flag.startsWith("--")) throw new UsageError(`unexpected argument ${flag}`);
    const eq = flag.indexOf("=");
    if (eq > 0) {
      args[flag.slice(2, eq)] = flag.slice(eq + 1);
    } else {
      if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
      args[flag.slice(2)] = argv[i + 1];
      i += 1;
    }
  }
  const known = new Set(["redis-url", "task", "entity", "queue", "kwargs", "task-id", "wait",
                         "timeout", "route", "shards", "vectors", "help", "h"]);
  for (const key of Object.keys(args)) {
    if (!known.has(key)) throw new UsageError(`unknown option --${key}`);
  }
  return args;
}

function positiveInt(text, what) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) throw new UsageError(`${what} must be a positive integer`);
  return value;
}

function routeRecord(entityId, shardCount) {
  const hash = entityHash(entityId);
  const index = Number(hash % BigInt(shardCount));
  // xxh64 is printed as a decimal string: a JSON number above 2^53 loses precision.
  return { entity_id: entityId, xxh64: hash.toString(10), xxh64_hex: xxh64Hex(hash),
           shard_count: shardCount, shard_index: index, shard: shardName(index) };
}

/** Recompute every vector of a routing-vectors.json file: {vectors: [...], mismatches}. */
function checkVectors(path) {
  const data = JSON.parse(fs.readFileSync(path, "utf8"));
  let mismatches = 0;
  const vectors = data.vectors.map((vector) => {
    const hash = entityHash(vector.entity_id);
    const row = { entity_id: vector.entity_id, xxh64: hash.toString(10), xxh64_hex: xxh64Hex(hash) };
    for (const key of Object.keys(vector)) {
      const match = /^shard_([0-9]+)$/.exec(key);
      if (match) row[key] = shardName(Number(hash % BigInt(match[1])));
    }
    if (row.xxh64_hex !== vector.xxh64_hex ||
        Object.keys(row).some((k) => k.startsWith("shard_") && row[k] !== vector[k])) {
      row.mismatch = true;
      mismatches += 1;
    }
    return row;
  });
  return { vectors, mismatches };
}

function errorOf(meta) {
  const result = meta.result;
  if (result && typeof result === "object" && "exc_type" in result) {
    return { exc_type: result.exc_type, exc_message: result.exc_message,
             exc_module: result.exc_module };
  }
  return { exc_type: meta.status, exc_message: [String(result)], exc_module: null };
}

async function main(argv) {
  const print = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
  let args;
  try {
    args = parseArgs(argv);
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    return EXIT.usage;
  }
  if (args.help || args.h) {
    process.stdout.write(`${USAGE}\n`);
    return EXIT.ok;
  }
  if (args.vectors !== undefined) {
    const checked = checkVectors(args.vectors);
    print(checked);
    return checked.mismatches ? EXIT.failed : EXIT.ok;
  }
  const url = args["redis-url"] || process.env.GPU_TASKS_REDIS_URL;
  let producer = null;
  let record = {};
  try {
    if (args.route !== undefined) {
      let shardCount;
      if (args.shards !== undefined) {
        shardCount = positiveInt(args.shards, "--shards");
      } else if (url) {
        producer = await Producer.connect(url);
        shardCount = await producer.getShardCount();
      } else {
        throw new UsageError("--route needs --shards S or --redis-url");
      }
      print(routeRecord(args.route, shardCount));
      return EXIT.ok;
    }
    if (!args.task) throw new UsageError("--task is required");
    if (!url) throw new UsageError("--redis-url (or GPU_TASKS_REDIS_URL) is required");
    let kwargs = {};
    if (args.kwargs !== undefined) {
      try {
        kwargs = JSON.parse(args.kwargs);
      } catch (err) {
        throw new UsageError(`--kwargs is not JSON: ${err.message}`);
      }
      if (kwargs === null || typeof kwargs !== "object" || Array.isArray(kwargs)) {
        throw new UsageError("--kwargs must be a JSON object");
      }
    }
    if (args.entity !== undefined) {
      if ("entity_id" in kwargs && kwargs.entity_id !== args.entity) {
        throw new UsageError("--entity and kwargs.entity_id differ");
      }
      kwargs = { entity_id: args.entity, ...kwargs };
    }
    const timeoutS = args.timeout === undefined ? 30 : Number(args.timeout);
    if (!(timeoutS > 0)) throw new UsageError("--timeout must be a positive number of seconds");
    producer = await Producer.connect(url);
    const sent = await producer.send(args.task, kwargs, { queue: args.queue,
                                                          taskId: args["task-id"] });
    record = { task_id: sent.taskId, task: args.task, queue: sent.queue };
    if ("entity_id" in kwargs) record.entity_id = kwargs.entity_id;
    if (!args.wait) {
      print(record);
      return EXIT.ok;
    }
    const meta = await producer.wait(sent.taskId, timeoutS);
    record.status = meta.status;
    if (meta.status === "SUCCESS") {
      record.result = meta.result;
      print(record);
      return EXIT.ok;
    }
    record.error = errorOf(meta);
    print(record);
    return EXIT.failed;
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`${err.message}\n${USAGE}\n`);
      return EXIT.usage;
    }
    const code = err instanceof RoutingError ? EXIT.usage
      : err instanceof TimeoutError ? EXIT.timeout : EXIT.redis;
    print({ ...record, status: err instanceof TimeoutError ? "TIMEOUT" : "ERROR",
            error: { exc_type: err.name, exc_message: [err.message], exc_module: null } });
    return code;
  } finally {
    if (producer) producer.close();
  }
}

module.exports = {
  GPU_QUEUE,
  Producer,
  READY_STATES,
  RESULT_KEY_PREFIX,
  RedisClient,
  RedisReplyError,
  RoutingError,
  SHARD_COUNT_FIELD,
  SHARD_MAP_META_KEY,
  TimeoutError,
  buildMessage,
  checkVectors,
  entityHash,
  parseRedisUrl,
  readShardCount,
  shardIndex,
  shardName,
  validateEntityId,
  xxh64,
  xxh64Hex,
};

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
