"""Hostile discriminator files, generated deterministically from a seed: every damage a downloaded file can carry.

Each case is made from a real file written by save_discriminator (both architectures, one of them
class-conditional), edited at the byte level (the safetensors layout: an 8-byte little-endian header length, the
JSON header, then the tensor data) or through safetensors' own writer. Every case knows the error it must give:
`expected` is a regular expression that the loader's problem text must match.

A pickle payload in some cases would create `marker` if it were ever unpickled."""
import json
import os
import pickle
import random
import re
import struct

import torch
from safetensors.torch import save_file

from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator, save_discriminator

SEED = 20230607
CATEGORIES = ("truncated", "header-json", "header-length", "dtype", "missing-tensor", "extra-tensor", "shape",
              "non-finite", "architecture-lie", "pickle", "metadata", "offsets", "garbage")


class Case:
    def __init__(self, category, name, expected):
        self.category, self.name, self.expected = category, name, expected
        self.path = None

    def __repr__(self):
        return f"{self.category}:{self.name}"


def base_discriminators():
    """name -> discriminator: the files every case is made from."""
    g = torch.Generator().manual_seed(SEED)
    info = dict(model_family="SD15", sigma_min=0.03, sigma_max=14.6, training={"real": 10})
    discs = {
        "standalone": StandaloneDiscriminator(DiscriminatorInfo(4, **info), width=16, levels=2, emb_dim=32),
        "features": FeatureHeadDiscriminator(DiscriminatorInfo(4, **info), feature_channels=64, width=32, emb_dim=32),
        "conditional": StandaloneDiscriminator(DiscriminatorInfo(4, num_classes=3, **info), width=16, levels=2,
                                               emb_dim=32),
    }
    with torch.no_grad():
        for d in discs.values():
            for p in d.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return discs


def split(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes, claimed=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def tensor_names(header):
    return sorted(k for k in header if k != "__metadata__")


class _WritesMarker:
    """Unpickling this creates a file: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _json_is_valid(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (ValueError, RecursionError):
        return False


class Fuzzer:
    def __init__(self, folder, marker, seed=SEED):
        self.folder, self.marker = str(folder), str(marker)
        self.rng = random.Random(seed)
        self.cases = []
        self.discs = base_discriminators()
        self.blobs = {}
        for name, d in self.discs.items():
            path = os.path.join(self.folder, f"base-{name}.safetensors")
            save_discriminator(d, path)
            with open(path, "rb") as f:
                self.blobs[name] = join(*split(f.read()))   # canonical key order: the same bytes every run
            os.remove(path)

    # --- writing --------------------------------------------------------------------------------------------
    def add(self, category, expected, blob=None, tensors=None, metadata=None, suffix=".safetensors"):
        case = Case(category, f"{category}-{sum(c.category == category for c in self.cases):03d}{suffix}",
                    expected)
        case.path = os.path.join(self.folder, case.name)
        if tensors is not None:
            save_file(tensors, case.path, metadata=metadata)
            with open(case.path, "rb") as f:
                blob = join(*split(f.read()))     # safetensors orders metadata at random: make it canonical
        with open(case.path, "wb") as f:
            f.write(blob)
        self.cases.append(case)
        return case

    def base(self, name=None):
        name = name or self.rng.choice(sorted(self.blobs))
        header, data = split(self.blobs[name])
        return name, header, data

    def state(self, name):
        """(tensors, metadata) of a base file, as safetensors' writer takes them."""
        header, _ = split(self.blobs[name])
        return ({k: v.detach().clone().contiguous() for k, v in self.discs[name].state_dict().items()},
                dict(header["__metadata__"]))

    # --- the categories ------------------------------------------------------------------------------------
    def truncated(self, n):
        for i in range(n):
            name, header, data = self.base()
            blob = self.blobs[name]
            header_end = 8 + struct.unpack("<Q", blob[:8])[0]
            cut = [0, 7, 8, header_end - 1, header_end, len(blob) - 1][i] if i < 6 else self.rng.randrange(len(blob))
            if cut < 8:
                expected = "shorter than a safetensors header"
            elif cut < header_end:
                expected = rf"header claims {header_end - 8} bytes but the file has {cut - 8} after it"
            else:
                expected = "points outside the file"
            self.add("truncated", expected, blob[:cut])

    def header_json(self, n):
        expected = "safetensors header is not valid JSON"
        fixed = [
            b"", b" " * 16, b"{", b'{"a": 1', b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000,
            b'{"x": ' + b"[" * 50000 + b"]" * 50000 + b"}", b'{"x": ' + b"9" * 5000 + b"}", b"{'single': 1}",
            b'{"__metadata__": {"a": "\xc3\x28"}}',
        ]
        for raw in fixed:
            self.add("header-json", expected, join(raw, b""))
        structural = set(b'{}[]":,')
        while sum(c.category == "header-json" for c in self.cases) < n:
            name, header, data = self.base()
            raw = bytearray(json.dumps(header, sort_keys=True).encode())
            kind = self.rng.randrange(3)
            if kind == 0:       # structural characters replaced by other bytes
                positions = [i for i, b in enumerate(raw) if b in structural]
                for i in self.rng.sample(positions, self.rng.randint(1, 3)):
                    raw[i] = self.rng.choice(b"\x00\xff#;@\\x ")
            elif kind == 1:     # random bytes flipped anywhere in the header
                for i in self.rng.sample(range(len(raw)), self.rng.randint(1, 4)):
                    raw[i] ^= 1 << self.rng.randrange(8)
            else:               # a header length shorter than the header: its JSON is cut
                raw = raw[:self.rng.randrange(1, len(raw) - 1)]
            if _json_is_valid(bytes(raw)):
                continue        # this edit happened to keep the JSON valid: draw another
            self.add("header-json", expected, join(bytes(raw), data))

    def header_length(self, n):
        name, header, data = self.base("standalone")
        blob = self.blobs[name]
        rest = blob[8:]
        claims = [2 ** 40, 2 ** 63, 2 ** 64 - 1, 2 ** 32, 2 ** 24 + 1, len(rest) + 1, len(rest) + 1000]
        while len(claims) < n:
            claims.append(self.rng.randrange(len(rest) + 1, 2 ** 64))
        for c in claims[:n]:
            self.add("header-length", rf"header claims {c} bytes but the file has {len(rest)} after it",
                     struct.pack("<Q", c) + rest)

    def dtype(self, n):
        wrong = ["I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "f32", "", "XYZ", "U64"]
        for i in range(n):
            name, header, data = self.base()
            k = self.rng.choice(tensor_names(header))
            if i % 4 == 3:      # a real integer tensor of the right shape, written by safetensors itself
                tensors, metadata = self.state(name)
                tensors[k] = torch.zeros(tensors[k].shape, dtype=self.rng.choice([torch.int64, torch.int32,
                                                                                   torch.uint8, torch.bool]))
                dt = {torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}[tensors[k].dtype]
                self.add("dtype", rf"tensor '{re.escape(k)}' is {dt} ", tensors=tensors, metadata=metadata)
            elif i % 4 == 2:    # a float dtype that does not fit the bytes: F16/BF16 over F32 data
                header[k]["dtype"] = self.rng.choice(["F16", "BF16", "F64"])
                self.add("dtype", "could not read its tensors", join(header, data))
            else:
                dt = self.rng.choice(wrong)
                header[k]["dtype"] = dt
                self.add("dtype", rf"tensor '{re.escape(k)}' is {re.escape(dt)} ", join(header, data))

    def missing(self, n):
        for i in range(n):
            name, header, data = self.base()
            gone = sorted(self.rng.sample(tensor_names(header), self.rng.randint(1, 3)))
            if i % 2:
                for k in gone:
                    del header[k]
                self.add("missing-tensor", rf"missing: \[{re.escape(repr(gone[0]))}", join(header, data))
            else:
                tensors, metadata = self.state(name)
                for k in gone:
                    del tensors[k]
                self.add("missing-tensor", rf"missing: \[{re.escape(repr(gone[0]))}", tensors=tensors,
                         metadata=metadata)

    def extra(self, n):
        for i in range(n):
            name, _, _ = self.base()
            tensors, metadata = self.state(name)
            names = sorted(f"{self.rng.choice(['extra', 'lora_up', 'blocks.9', 'pool.q'])}.w{self.rng.randrange(99)}"
                           for _ in range(self.rng.randint(1, 3)))
            for k in names:
                tensors[k] = torch.zeros(self.rng.randint(1, 8))
            self.add("extra-tensor", rf"unexpected: \[{re.escape(repr(names[0]))}", tensors=tensors,
                     metadata=metadata)

    def shape(self, n):
        for i in range(n):
            name, header, data = self.base()
            k = self.rng.choice(tensor_names(header))
            shape = list(header[k]["shape"])
            kind = i % 5
            if kind == 0:
                new = shape[::-1] if len(set(shape)) > 1 else shape + [1]
            elif kind == 1:
                j = self.rng.randrange(len(shape))
                new = shape[:j] + [shape[j] + self.rng.choice([1, 7, 2 ** 20])] + shape[j + 1:]
            elif kind == 2:
                new = shape + [1]
            elif kind == 3:
                new = []
            else:
                new = [2 ** 40] * len(shape)    # far beyond the file: never allocated
            header[k]["shape"] = new
            self.add("shape", rf"tensor '{re.escape(k)}' is F32 {re.escape(str(new))}, but the declared \w+ "
                     rf"architecture needs a float tensor of shape {re.escape(str(shape))}", join(header, data))

    def non_finite(self, n):
        for i in range(n):
            name, _, _ = self.base()
            tensors, metadata = self.state(name)
            k = self.rng.choice(sorted(tensors))
            t = tensors[k].clone()
            t.view(-1)[self.rng.randrange(t.numel())] = self.rng.choice([float("nan"), float("inf"), float("-inf")])
            dtype = [torch.float32, torch.float16, torch.bfloat16, torch.float64][i % 4]
            tensors = {j: v.to(dtype) for j, v in tensors.items()}
            tensors[k] = t.to(dtype)
            if i % 7 == 6:      # a float64 weight beyond float32's range becomes inf when loaded
                tensors = {j: v.double() for j, v in self.state(name)[0].items()}
                tensors[k] = tensors[k] * 1e300
            self.add("non-finite", rf"\[{re.escape(repr(k))}\] hold NaN or infinite", tensors=tensors,
                     metadata=metadata)

    def architecture_lie(self, n):
        lies = [
            ("standalone", "comfy_dg.architecture", "features"),
            ("features", "comfy_dg.architecture", "standalone"),
            ("conditional", "comfy_dg.architecture", "features"),
            ("standalone", "config", {"width": 32}), ("standalone", "config", {"width": 8}),
            ("standalone", "config", {"levels": 3}), ("standalone", "config", {"levels": 1}),
            ("standalone", "config", {"emb_dim": 64}), ("features", "config", {"feature_channels": 128}),
            ("features", "config", {"width": 64}), ("features", "config", {"emb_dim": 16}),
            ("standalone", "info", {"latent_channels": 16}), ("standalone", "info", {"num_classes": 5}),
            ("conditional", "info", {"num_classes": 0}), ("conditional", "info", {"num_classes": 7}),
            ("features", "info", {"num_classes": 2}),
        ]
        self.rng.shuffle(lies)
        for i in range(n):
            base, field, value = lies[i % len(lies)]
            _, header, data = self.base(base)
            meta = header["__metadata__"]
            arch = meta["comfy_dg.architecture"]
            if field == "comfy_dg.architecture":
                arch = value
                meta[field] = value
                meta["comfy_dg.config"] = json.dumps(self.discs["features" if value == "features"
                                                                else "standalone"].config())
            else:
                key = f"comfy_dg.{field}"
                meta[key] = json.dumps({**json.loads(meta[key]), **value})
            if i >= len(lies):   # a second round: the same lie with a huge block count on top
                meta["comfy_dg.config"] = json.dumps({**json.loads(meta["comfy_dg.config"]), "levels": 10 ** 9}) \
                    if arch == "standalone" else meta["comfy_dg.config"]
            expected = (rf"do not match the {arch} architecture|the declared {arch} architecture needs|"
                        rf"declares levels=1000000000, more blocks than")
            self.add("architecture-lie", expected, join(header, data))

    def pickles(self, n):
        payload = _WritesMarker(self.marker)
        header_expected = r"header claims \d+ bytes|shorter than a safetensors header|header is not valid JSON"
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            self.add("pickle", header_expected, pickle.dumps({"state_dict": payload}, protocol=protocol))
        for suffix in (".pt", ".ckpt", ".pth", ".bin", ".pkl", ".pickle", ".PT", ".Ckpt"):
            self.add("pickle", "pickle-based file", pickle.dumps(payload), suffix=suffix)
        path = os.path.join(self.folder, "torch-zip.tmp")
        torch.save({"w": torch.zeros(3), "x": payload}, path)
        with open(path, "rb") as f:
            zipped = f.read()
        torch.save({"w": torch.zeros(3), "x": payload}, path, _use_new_zipfile_serialization=False)
        with open(path, "rb") as f:
            legacy = f.read()
        os.remove(path)
        self.add("pickle", header_expected, zipped)
        self.add("pickle", header_expected, legacy)
        # A safetensors-looking start with a pickle behind it: the header is JSON-checked, the rest never unpickled.
        self.add("pickle", header_expected, join(b'{"__metadata__": {}, ', pickle.dumps(payload)))
        while sum(c.category == "pickle" for c in self.cases) < n:
            self.add("pickle", header_expected, pickle.dumps([self.rng.random(), payload],
                                                             protocol=self.rng.randrange(2, 6)))

    def metadata(self, n):
        def edit(base, change, expected):
            _, header, data = self.base(base)
            change(header["__metadata__"])
            self.add("metadata", expected, join(header, data))

        def setter(key, value):
            return lambda m: m.__setitem__(key, value)

        def merge(key, **fields):
            return lambda m: m.__setitem__(key, json.dumps({**json.loads(m[key]), **fields}))

        def drop(key):
            return lambda m: m.pop(key)
        edits = [
            (drop("comfy_dg.format"), "no comfy-dg metadata"),
            (setter("comfy_dg.format", "3"), "file format '3'"), (setter("comfy_dg.format", ""), "file format ''"),
            (setter("comfy_dg.architecture", "gan"), "architecture 'gan' is unknown"),
            (drop("comfy_dg.architecture"), "architecture None is unknown"),
            (setter("comfy_dg.config", '{"width": 16,'), "metadata is malformed"),
            (setter("comfy_dg.config", "[16, 2]"), "metadata is malformed"),
            (setter("comfy_dg.config", "[" * 100000 + "]" * 100000), "metadata is malformed"),
            (setter("comfy_dg.info", "latent_channels=4"), "metadata is malformed"),
            (drop("comfy_dg.info"), "metadata is malformed"),
            (merge("comfy_dg.info", sigma_min=5.0, sigma_max=1.0), "metadata is malformed"),
            (merge("comfy_dg.info", latent_channels=-4), "metadata is malformed"),
            (merge("comfy_dg.info", unknown_field=1), "metadata is malformed"),
            (merge("comfy_dg.config", width=-1), "hyper-parameters are invalid"),
            (merge("comfy_dg.config", width="16"), "hyper-parameters are invalid"),
            (merge("comfy_dg.config", depth=3), "hyper-parameters are invalid"),
            (merge("comfy_dg.config", levels=10 ** 12), "declares levels=1000000000000, more blocks than"),
            (merge("comfy_dg.config", width=10 ** 30), "hyper-parameters are invalid"),
            (merge("comfy_dg.config", emb_dim=0), r"needs a float tensor of shape \[0, 0\]"),
            (merge("comfy_dg.config", levels=-5), "do not match the standalone architecture"),
            (setter("comfy_dg.note", 5), "not a table of strings"),
        ]
        for i in range(n):
            change, expected = edits[i % len(edits)]
            edit("standalone", change, expected)
        path = os.path.join(self.folder, "no-metadata.tmp")
        save_file({"w": torch.zeros(2)}, path)
        with open(path, "rb") as f:
            self.add("metadata", "no comfy-dg metadata", join(*split(f.read())))
        os.remove(path)

    def offsets(self, n):
        for i in range(n):
            name, header, data = self.base()
            k = self.rng.choice(tensor_names(header))
            a, b = header[k]["data_offsets"]
            kind = i % 6
            if kind == 0:
                header[k]["data_offsets"] = [a, len(data) + self.rng.randint(1, 2 ** 40)]
                expected = "points outside the file"
            elif kind == 1:
                header[k]["data_offsets"] = [b, a] if b > a else [a + 1, a]
                expected = "points outside the file"
            elif kind == 2:
                header[k]["data_offsets"] = [-self.rng.randint(1, 100), b]
                expected = "points outside the file"
            elif kind == 3:
                header[k]["data_offsets"] = [a, float(b)]
                expected = "points outside the file"
            elif kind == 4:
                header[k]["data_offsets"] = [a, b - 4]     # data shorter than the shape needs
                expected = "could not read its tensors"
            else:
                header[k]["data_offsets"] = [a]
                expected = "points outside the file"
            self.add("offsets", expected, join(header, data))

    def garbage(self, n):
        expected = (r"shorter than a safetensors header|header claims \d+ bytes|header is not valid JSON|"
                    r"not a JSON object")
        self.add("garbage", expected, b"")
        self.add("garbage", expected, join(b"[1, 2, 3]", b""))
        self.add("garbage", expected, join(b'"just a string"', b""))
        self.add("garbage", expected, join(b"null", b""))
        while sum(c.category == "garbage" for c in self.cases) < n:
            size = self.rng.choice([1, 5, 9, 100, 4096, 70000])
            self.add("garbage", expected, bytes(self.rng.randrange(256) for _ in range(size)))

    def all(self):
        self.truncated(30)
        self.header_json(30)
        self.header_length(16)
        self.dtype(24)
        self.missing(16)
        self.extra(12)
        self.shape(20)
        self.non_finite(21)
        self.architecture_lie(24)
        self.pickles(20)
        self.metadata(22)
        self.offsets(18)
        self.garbage(12)
        return self.cases


def generate(folder, marker, seed=SEED):
    return Fuzzer(folder, marker, seed).all()


def controls(folder):
    """The unedited base files, which must load (so the cases above are refused for their damage alone)."""
    paths = []
    for name, d in base_discriminators().items():
        path = os.path.join(str(folder), f"control-{name}.safetensors")
        save_discriminator(d, path)
        paths.append(path)
    return paths
