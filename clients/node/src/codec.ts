/**
 * msgpack as titan-broker speaks it (PROTOCOL.md, "Values").
 *
 * Out: numbers (integers as msgpack ints, others as float 64), strings, booleans, null/undefined
 * (nil), Uint8Array (bin), arrays, Set (array), plain objects and Map (map), Date (the timestamp
 * extension, -1), bigint (an int when it fits in 64 bits, else extension 1). In: the same, with an
 * integer beyond 2^53 as a bigint and the timestamp extension as a Date.
 */
import { Decoder, Encoder, ExtensionCodec } from "@msgpack/msgpack";

import { EncodeError } from "./errors.js";

export const EXT_BIGINT = 1;
const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;
const SAFE_MAX = BigInt(Number.MAX_SAFE_INTEGER);
const SAFE_MIN = BigInt(Number.MIN_SAFE_INTEGER);

/** Signed big-endian two's complement bytes of an integer, as Python's int.to_bytes(signed=True). */
export function bigintToBytes(value: bigint): Uint8Array {
  let bits = 0;
  for (let v = value < 0n ? -value - 1n : value; v > 0n; v >>= 1n) bits++;
  const size = Math.floor((bits + 8) / 8); // a sign bit included
  const out = new Uint8Array(size);
  let v = BigInt.asUintN(size * 8, value);
  for (let i = size - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

export function bytesToBigint(data: Uint8Array): bigint {
  let v = 0n;
  for (const byte of data) v = (v << 8n) | BigInt(byte);
  return data.length > 0 ? BigInt.asIntN(data.length * 8, v) : 0n;
}

/** A bigint as a number when that is exact, else as it is. */
function narrow(value: bigint): number | bigint {
  return value >= SAFE_MIN && value <= SAFE_MAX ? Number(value) : value;
}

const extensions = new ExtensionCodec();
extensions.register({
  type: EXT_BIGINT,
  encode: () => null, // bigints are written by TitanEncoder.doEncode
  decode: (data: Uint8Array) => narrow(bytesToBigint(data)),
});

// The library's private methods are replaced on subclasses' prototypes: it offers no hook for a
// 64-bit integer that is exact as a number but not beyond, nor for a bigint beyond 64 bits.
interface EncoderInternals {
  doEncode(object: unknown, depth: number): void;
  encodeObject(object: unknown, depth: number): void;
  encodeExtension(ext: { type: number; data: Uint8Array }): void;
  encodeBigInt64(object: bigint): void;
  encodeNumber(object: number): void;
  encodeNumberAsFloat(object: number): void;
}
interface DecoderInternals {
  view: DataView;
  pos: number;
}

class TitanEncoder extends Encoder {}
const encoderProto = TitanEncoder.prototype as unknown as EncoderInternals;
const baseDoEncode = encoderProto.doEncode;
const baseEncodeObject = encoderProto.encodeObject;
encoderProto.doEncode = function (this: EncoderInternals, object: unknown, depth: number): void {
  if (typeof object === "bigint") {
    if (object >= SAFE_MIN && object <= SAFE_MAX) this.encodeNumber(Number(object));
    else if (object >= INT64_MIN && object <= UINT64_MAX) this.encodeBigInt64(object);
    else this.encodeExtension({ type: EXT_BIGINT, data: bigintToBytes(object) });
    return;
  }
  if (typeof object === "number" && Number.isInteger(object) && !Number.isSafeInteger(object)) {
    this.encodeNumberAsFloat(object); // beyond 2^53 a number is not exact: a float, as it is
    return;
  }
  if (typeof object === "function" || typeof object === "symbol") {
    throw new EncodeError("titan.EncodeError", `a ${typeof object} cannot cross the wire`);
  }
  baseDoEncode.call(this, object, depth);
};
encoderProto.encodeObject = function (this: EncoderInternals, object: unknown, depth: number): void {
  if (object instanceof Date) {
    if (Number.isNaN(object.getTime())) throw new EncodeError("titan.EncodeError", "an invalid Date cannot cross the wire");
  } else if (object instanceof Set) {
    baseEncodeObject.call(this, [...object], depth);
    return;
  } else if (object instanceof Map) {
    const plain: Record<string, unknown> = {};
    for (const [k, v] of object) {
      if (typeof k !== "string" && typeof k !== "number") {
        throw new EncodeError("titan.EncodeError", `a Map key of type ${typeof k} cannot cross the wire (use strings or numbers)`);
      }
      plain[String(k)] = v;
    }
    baseEncodeObject.call(this, plain, depth);
    return;
  } else if (object instanceof ArrayBuffer) {
    baseEncodeObject.call(this, new Uint8Array(object), depth);
    return;
  }
  baseEncodeObject.call(this, object, depth);
};

class TitanDecoder extends Decoder {}
const decoderProto = TitanDecoder.prototype as unknown as { readU64(): number | bigint; readI64(): number | bigint };
decoderProto.readU64 = function (this: DecoderInternals): number | bigint {
  const value = this.view.getBigUint64(this.pos);
  this.pos += 8;
  return narrow(value);
};
decoderProto.readI64 = function (this: DecoderInternals): number | bigint {
  const value = this.view.getBigInt64(this.pos);
  this.pos += 8;
  return narrow(value);
};

const MAX_DEPTH = 64;
const encoder = new TitanEncoder({ extensionCodec: extensions, ignoreUndefined: true, maxDepth: MAX_DEPTH });
const decoder = new TitanDecoder({
  extensionCodec: extensions,
  mapKeyConverter: (key: unknown) => {
    if (typeof key === "string" || typeof key === "number") return key;
    if (typeof key === "bigint" || typeof key === "boolean" || key === null) return String(key);
    throw new Error(`a map key of type ${typeof key} cannot be read into an object`);
  },
});

/** Encode a value; raises EncodeError naming what cannot cross the wire. */
export function pack(value: unknown): Uint8Array {
  try {
    return encoder.encode(value);
  } catch (exc) {
    if (exc instanceof EncodeError) throw exc;
    throw new EncodeError("titan.EncodeError", `cannot be encoded as msgpack: ${(exc as Error).message}`);
  }
}

/** Decode one msgpack value; raises on garbage or an unknown extension type. */
export function unpack(data: Uint8Array): unknown {
  // A Buffer's bin values would come out as Buffers: a plain view makes them plain Uint8Arrays.
  const view = Buffer.isBuffer(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data;
  return decoder.decode(view);
}

/**
 * A map of byte strings as msgpack with the raw (str) type, never bin: a delayed call's member
 * of the delayed set, which Redis's Lua (cmsgpack) unpacks into the entry's fields.
 */
export function packRawMap(fields: Array<[string, Uint8Array]>): Buffer {
  const parts: Buffer[] = [];
  const n = fields.length;
  parts.push(n < 16 ? Buffer.from([0x80 | n]) : n < 0x10000 ? Buffer.from([0xde, n >> 8, n & 0xff]) : header32(0xdf, n));
  for (const [name, value] of fields) {
    parts.push(rawHeader(Buffer.byteLength(name)), Buffer.from(name), rawHeader(value.length), Buffer.from(value));
  }
  return Buffer.concat(parts);
}

function rawHeader(size: number): Buffer {
  if (size < 32) return Buffer.from([0xa0 | size]);
  if (size < 0x100) return Buffer.from([0xd9, size]);
  if (size < 0x10000) return Buffer.from([0xda, size >> 8, size & 0xff]);
  return header32(0xdb, size);
}

function header32(code: number, size: number): Buffer {
  const b = Buffer.alloc(5);
  b[0] = code;
  b.writeUInt32BE(size, 1);
  return b;
}
