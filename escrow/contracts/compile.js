#!/usr/bin/env node
// Compile the escrow contracts with solcjs (npm `solc`, pinned in package.json) through the standard-JSON
// interface and write one artifact per contract to escrow/contracts/build/<Name>.json:
//
//   {"contractName", "abi", "bytecode", "deployedBytecode", "sourceHash"}
//
// sourceHash = sha256 over a canonical JSON of {compiler version, compiler settings, the sha256 of every
// source file the contract was compiled from (its own and the imported OpenZeppelin files)}, so a stale
// artifact is visible without compiling. Output is deterministic: fixed source unit names (no absolute
// paths), fixed settings, pretty-printed JSON with a trailing newline.
//
// Usage:
//   node escrow/contracts/compile.js           write the artifacts
//   node escrow/contracts/compile.js --check   compile in memory and exit 1 if the committed artifacts
//                                              differ (CI freshness check); writes nothing
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

const CONTRACTS_DIR = __dirname;
const BUILD_DIR = path.join(CONTRACTS_DIR, "build");
const REPO_ROOT = path.resolve(CONTRACTS_DIR, "..", "..");
// Contracts to compile and ship, by file; each file's contract of the same name gets an artifact.
const CONTRACTS = ["UsageEscrow", "MockUSDC"];

// Pinned compiler settings. Changing any of them changes every sourceHash (and the bytecode).
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  metadata: { bytecodeHash: "ipfs", appendCBOR: true },
  outputSelection: {
    "*": {
      "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "metadata"],
    },
  },
};

function loadSolc() {
  try {
    return require(require.resolve("solc", { paths: [REPO_ROOT] }));
  } catch (err) {
    fail(2, "solc is not installed: run `npm ci` (or `make node_modules`) at the repository root.");
  }
}

function fail(code, message) {
  process.stderr.write(`compile.js: ${message}\n`);
  process.exit(code);
}

function sha256(text) {
  return crypto.createHash("sha256").update(text, "utf8").digest("hex");
}

// JSON with object keys sorted at every level (arrays keep their order).
function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

// Resolve an import's source unit name to a file: "@scope/pkg/..." from node_modules, the rest from here.
function resolveImport(unitName) {
  if (unitName.startsWith("@")) {
    const [scope, pkg, ...rest] = unitName.split("/");
    let pkgJson;
    try {
      pkgJson = require.resolve(`${scope}/${pkg}/package.json`, { paths: [REPO_ROOT] });
    } catch (err) {
      return null;
    }
    return path.join(path.dirname(pkgJson), ...rest);
  }
  const file = path.resolve(CONTRACTS_DIR, unitName);
  return file.startsWith(CONTRACTS_DIR + path.sep) ? file : null;
}

function compile() {
  const solc = loadSolc();
  const sources = {};
  for (const name of CONTRACTS) {
    const unit = `${name}.sol`;
    sources[unit] = { content: fs.readFileSync(path.join(CONTRACTS_DIR, unit), "utf8") };
  }
  const loaded = {}; // every source unit the compiler saw, by name -> content
  for (const [unit, { content }] of Object.entries(sources)) loaded[unit] = content;

  const findImports = (unitName) => {
    const file = resolveImport(unitName);
    if (!file || !fs.existsSync(file)) {
      return { error: `not found: ${unitName} (run \`npm ci\` at the repository root)` };
    }
    const content = fs.readFileSync(file, "utf8");
    loaded[unitName] = content;
    return { contents: content };
  };

  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const diagnostics = output.errors || [];
  const errors = diagnostics.filter((d) => d.severity === "error");
  for (const d of diagnostics) {
    if (d.severity !== "error" && !process.argv.includes("--quiet")) {
      process.stderr.write(d.formattedMessage || d.message);
    }
  }
  if (errors.length) {
    for (const d of errors) process.stderr.write(d.formattedMessage || d.message);
    fail(2, `compilation failed with ${errors.length} error(s)`);
  }

  const compilerVersion = solc.version();
  const artifacts = {};
  for (const name of CONTRACTS) {
    const unit = `${name}.sol`;
    const out = output.contracts && output.contracts[unit] && output.contracts[unit][name];
    if (!out) fail(2, `no output for ${unit}:${name}`);
    const metadata = JSON.parse(out.metadata);
    const used = Object.keys(metadata.sources).sort();
    const sourceDigests = {};
    for (const unitName of used) {
      if (!(unitName in loaded)) fail(2, `source ${unitName} used by ${name} was not loaded`);
      sourceDigests[unitName] = sha256(loaded[unitName]);
    }
    const sourceHash = sha256(
      canonicalJson({ compiler: compilerVersion, settings: SETTINGS, sources: sourceDigests }),
    );
    const artifact = {
      contractName: name,
      abi: out.abi,
      bytecode: `0x${out.evm.bytecode.object}`,
      deployedBytecode: `0x${out.evm.deployedBytecode.object}`,
      sourceHash: `0x${sourceHash}`,
    };
    artifacts[name] = `${JSON.stringify(artifact, null, 2)}\n`;
  }
  return { compilerVersion, artifacts };
}

function check(artifacts) {
  const problems = [];
  for (const [name, text] of Object.entries(artifacts)) {
    const file = path.join(BUILD_DIR, `${name}.json`);
    const rel = path.relative(REPO_ROOT, file);
    if (!fs.existsSync(file)) {
      problems.push(`${rel}: missing`);
      continue;
    }
    const committed = fs.readFileSync(file, "utf8");
    if (committed === text) continue;
    let fields = [];
    try {
      const a = JSON.parse(committed);
      const b = JSON.parse(text);
      fields = Object.keys(b).filter((k) => canonicalJson(a[k]) !== canonicalJson(b[k]));
    } catch (err) {
      fields = ["(not valid JSON)"];
    }
    problems.push(`${rel}: stale (${fields.length ? `differs in ${fields.join(", ")}` : "formatting differs"})`);
  }
  if (problems.length) {
    process.stderr.write(
      "Contract artifacts are out of date with the Solidity sources:\n" +
        problems.map((p) => `  - ${p}\n`).join("") +
        "Run `node escrow/contracts/compile.js` and commit escrow/contracts/build/.\n",
    );
    process.exit(1);
  }
  process.stdout.write(`contract artifacts are up to date (${Object.keys(artifacts).join(", ")})\n`);
}

function write(artifacts, compilerVersion) {
  fs.mkdirSync(BUILD_DIR, { recursive: true });
  for (const [name, text] of Object.entries(artifacts)) {
    const file = path.join(BUILD_DIR, `${name}.json`);
    fs.writeFileSync(file, text);
    process.stdout.write(`wrote ${path.relative(REPO_ROOT, file)}\n`);
  }
  process.stdout.write(`solc ${compilerVersion}\n`);
}

function main() {
  const args = process.argv.slice(2);
  const unknown = args.filter((a) => !["--check", "--quiet"].includes(a));
  if (unknown.length) fail(2, `unknown argument(s): ${unknown.join(" ")}; usage: compile.js [--check] [--quiet]`);
  const { compilerVersion, artifacts } = compile();
  if (args.includes("--check")) check(artifacts);
  else write(artifacts, compilerVersion);
}

main();
