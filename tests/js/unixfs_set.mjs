// Build a UnixFS CAR set from a directory with @ipld/unixfs, the way data-preparation tools lay
// large data sets out: file blocks split across several CARs of about --car-size bytes (a large
// file spans several), the directory DAG (directories and symlinks) in a CAR of its own.
//
//   node unixfs_set.mjs SRC OUT [--chunk 262144] [--car-size 1048576] [--cid-version 0|1]
//                               [--layout trickle|balanced] [--shard-above 500]
//
// Leaves are dag-pb UnixFS nodes (what kubo writes without --raw-leaves); modes and mtimes are
// recorded (UnixFS 1.5; @ipld/unixfs 3.0.0 writes none for a sharded directory). Every CAR's header names one root: the directory CAR the root directory,
// a data CAR its last block. Prints JSON: {root, cars: [{name, root, blocks, paths}], files:
// {path: cid}} where `paths` are the files with at least one block in that CAR.
import * as fs from "node:fs"
import * as path from "node:path"
import { Readable } from "node:stream"
import { pipeline } from "node:stream/promises"
import * as UnixFS from "@ipld/unixfs"
import * as Trickle from "@ipld/unixfs/file/layout/trickle"
import * as Balanced from "@ipld/unixfs/file/layout/balanced"
import * as FixedSize from "@ipld/unixfs/file/chunker/fixed"
import { CarWriter } from "@ipld/car/writer"
import { CID } from "multiformats/cid"
import { sha256 } from "multiformats/hashes/sha2"

const args = process.argv.slice(2)
const [src, out] = args.filter((a, i) => !a.startsWith("--") && !(i > 0 && args[i - 1].startsWith("--")))
const option = (name, fallback) => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? args[i + 1] : fallback
}
const chunk = Number(option("chunk", 262144))
const carSize = Number(option("car-size", 1 << 20))
const cidVersion = Number(option("cid-version", 1))
const layout = option("layout", "trickle")
const shardAbove = Number(option("shard-above", 500))

const linker = cidVersion === 0 ? { createLink: (code, digest) => CID.createV0(digest) } : { createLink: CID.createV1 }

// @ipld/unixfs 3.0.0 takes a file's metadata but never writes it (its branch and leaf encoders get
// none); these encoders put it on the node that covers the whole file, i.e. the root, as kubo's
// --preserve-mode/--preserve-mtime do. Files are written one at a time, so `current` is the file's.
let current = { size: -1, metadata: undefined }
const sum = parts => parts.reduce((n, p) => n + p.contentByteLength, 0)
const leafEncoder = {
  code: UnixFS.code,
  name: "unixfs-leaf",
  encode: content =>
    UnixFS.encode({
      type: UnixFS.NodeType.File,
      layout: "simple",
      content,
      metadata: content.byteLength === current.size ? current.metadata : undefined,
    }),
}
const branchEncoder = {
  code: UnixFS.code,
  name: "unixfs-branch",
  encode: node => UnixFS.encode({ ...node, metadata: sum(node.parts) === current.size ? current.metadata : undefined }),
}
const settings = UnixFS.configure({
  chunker: FixedSize.withMaxChunkSize(chunk),
  fileChunkEncoder: leafEncoder, // dag-pb leaves
  smallFileEncoder: leafEncoder,
  fileEncoder: branchEncoder,
  fileLayout: layout === "trickle" ? Trickle.configure({ maxDirectLeaves: 4, maxSiblingSubgroups: 2 }) : Balanced.withWidth(174),
  linker,
})

// One block stream per kind, so that file blocks and directory blocks go to different CARs.
const stream = () => {
  const { readable, writable } = new TransformStream({}, { highWaterMark: 1 << 16 })
  const blocks = []
  const done = (async () => {
    for await (const block of readable) blocks.push(block)
  })()
  return { writer: UnixFS.createWriter({ writable, settings }), blocks, done }
}
const files = stream()
const dirs = stream()
const owner = new Map() // block CID string -> file path (the first file that wrote it)
const fileRoots = {}

const metadata = st => ({
  mode: Number(st.mode & 0o7777n),
  mtime: { secs: Math.floor(Number(st.mtimeNs / 1000000000n)), nsecs: Number(st.mtimeNs % 1000000000n) },
})

async function addFile(full, rel, st) {
  const before = files.blocks.length
  current = { size: Number(st.size), metadata: metadata(st) }
  const file = files.writer.createFileWriter({ metadata: metadata(st) })
  const handle = await fs.promises.open(full)
  const buffer = Buffer.alloc(1 << 20)
  for (;;) {
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, null)
    if (!bytesRead) break
    await file.write(new Uint8Array(buffer.subarray(0, bytesRead)))
  }
  await handle.close()
  const link = await file.close()
  // blocks reach `files.blocks` asynchronously: wait until this file's root is among them
  while (!files.blocks.slice(before).some(b => b.cid.equals(link.cid))) await new Promise(r => setTimeout(r, 1))
  for (const b of files.blocks.slice(before)) if (!owner.has(b.cid.toString())) owner.set(b.cid.toString(), rel)
  fileRoots[rel] = link.cid.toString()
  return link
}

async function addSymlink(full, st) {
  const target = fs.readlinkSync(full, { encoding: "buffer" })
  const bytes = UnixFS.encode({ type: UnixFS.NodeType.Symlink, content: new Uint8Array(target), metadata: metadata(st) })
  const cid = linker.createLink(UnixFS.code, await sha256.digest(bytes))
  dirs.blocks.push({ cid, bytes })
  return { cid, dagByteLength: bytes.length }
}

async function addDir(full, rel, st) {
  const names = fs.readdirSync(full).sort()
  const sharded = names.length > shardAbove
  const dir = sharded
    ? UnixFS.createShardedDirectoryWriter({ writer: dirs.writer.writer, settings, metadata: metadata(st) })
    : UnixFS.createDirectoryWriter({ writer: dirs.writer.writer, settings, metadata: metadata(st) })
  for (const name of names) {
    const childFull = path.join(full, name)
    const childRel = rel ? `${rel}/${name}` : name
    const cst = fs.lstatSync(childFull, { bigint: true })
    let link
    if (cst.isSymbolicLink()) link = await addSymlink(childFull, cst)
    else if (cst.isDirectory()) link = await addDir(childFull, childRel, cst)
    else if (cst.isFile()) link = await addFile(childFull, childRel, cst)
    else continue
    dir.set(name, link)
  }
  return await dir.close()
}

const rootLink = await addDir(src, "", fs.lstatSync(src, { bigint: true }))
await files.writer.close()
await dirs.writer.close()
await files.done
await dirs.done

async function writeCar(name, root, blocks) {
  const { writer, out: bytes } = CarWriter.create([root])
  const done = pipeline(Readable.from(bytes), fs.createWriteStream(path.join(out, name)))
  for (const block of blocks) await writer.put(block)
  await writer.close()
  await done
}

fs.mkdirSync(out, { recursive: true })
const cars = []
let group = []
let size = 0
const flush = async () => {
  if (!group.length) return
  const name = `data-${String(cars.length).padStart(3, "0")}.car`
  const root = group[group.length - 1].cid
  await writeCar(name, root, group)
  const paths = [...new Set(group.map(b => owner.get(b.cid.toString())).filter(p => p !== undefined))]
  cars.push({ name, root: root.toString(), blocks: group.length, paths })
  group = []
  size = 0
}
for (const block of files.blocks) {
  if (size && size + block.bytes.length > carSize) await flush()
  group.push(block)
  size += block.bytes.length
}
await flush()
await writeCar("dirs.car", rootLink.cid, dirs.blocks)
cars.push({ name: "dirs.car", root: rootLink.cid.toString(), blocks: dirs.blocks.length, paths: [] })
process.stdout.write(JSON.stringify({ root: rootLink.cid.toString(), cars, files: fileRoots }) + "\n")
