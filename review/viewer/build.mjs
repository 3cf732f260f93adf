// Bundles src/viewer.js with esbuild into one output folder (default ../static/viewer):
//   viewer.js                     the ES module the reading room imports (mountViewer)
//   decodeImageFrameWorker.js     dicom-image-loader's decode worker (module worker)
//   computeWorker.js              cornerstone tools' compute worker (segmentation statistics)
//   *.wasm                        the codecs the decode worker loads on demand
//
// Cornerstone's packages locate their workers and wasm with `new URL(spec, import.meta.url)`
// (a webpack/vite idiom esbuild leaves alone). The plugin below resolves every such spec,
// emits the file next to viewer.js and rewrites the call to `new URL("./<file>", import.meta.url)`,
// so everything is fetched from the bundle's own folder. A spec it cannot resolve fails the
// build, and so does any http(s) URL to a known CDN left in the output.
import * as esbuild from "esbuild";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(here, process.argv[2] || "../static/viewer");
const minify = process.env.VIEWER_MINIFY !== "0";
const sourcemap = process.env.VIEWER_SOURCEMAP === "1" ? "linked" : false;

const URL_RE = /new URL\(\s*(["'])([^"']+)\1\s*,\s*import\.meta\.url\s*\)/g;
const workers = new Map(); // output name -> absolute source path
const assets = new Map(); // output name -> absolute source path

function claim(map, name, abs) {
  const prev = map.get(name);
  if (prev && prev !== abs) {
    throw new Error(`two different files want the output name ${name}: ${prev}, ${abs}`);
  }
  map.set(name, abs);
}

const assetUrlPlugin = {
  name: "asset-url",
  setup(build) {
    build.onLoad({ filter: /\.m?js$/ }, async (args) => {
      const source = await fs.promises.readFile(args.path, "utf8");
      if (!source.includes("import.meta.url")) return undefined;
      const found = [...source.matchAll(URL_RE)];
      if (!found.length) return undefined;
      const dir = path.dirname(args.path);
      const replacements = new Map();
      for (const [, , spec] of found) {
        if (replacements.has(spec)) continue;
        if (spec.endsWith("/")) {
          replacements.set(spec, spec); // a folder ("./" = the bundle's own folder): kept as is
          continue;
        }
        let abs;
        if (spec.startsWith(".") || !spec.includes("/")) {
          // "./x.js", "../workers/x.js" or a bare file name next to the module ("x.wasm")
          abs = path.resolve(dir, spec);
        } else {
          const r = await build.resolve(spec, { kind: "import-statement", resolveDir: dir });
          if (r.errors.length) throw new Error(`cannot resolve ${spec} from ${args.path}`);
          abs = r.path;
        }
        if (!fs.existsSync(abs)) throw new Error(`${spec} from ${args.path}: ${abs} is missing`);
        const name = path.basename(abs);
        if (/\.m?js$/.test(name)) claim(workers, name, abs);
        else claim(assets, name, abs);
        replacements.set(spec, name);
      }
      const contents = source.replace(URL_RE, (_m, _q, spec) => {
        const target = replacements.get(spec);
        const rel = target.endsWith("/") ? target : `./${target}`;
        return `new URL(${JSON.stringify(rel)}, import.meta.url)`;
      });
      return { contents, loader: "js", resolveDir: dir };
    });
  },
};

// Node built-ins that browser code names but never reaches: Emscripten's Node branch
// (require("fs")), seedrandom's optional crypto, and @oozcitak/url (via vtk.js' XML writer, unused
// here), which requires "url" when loaded. Each resolves to an empty CommonJS module.
const NODE_BUILTINS = ["fs", "path", "crypto", "module", "url", "worker_threads"];
const nodeStubPlugin = {
  name: "node-stub",
  setup(build) {
    const filter = new RegExp(`^(node:)?(${NODE_BUILTINS.join("|")})$`);
    build.onResolve({ filter }, (args) => ({ path: args.path, namespace: "node-stub" }));
    build.onLoad({ filter: /.*/, namespace: "node-stub" }, () => ({ contents: "module.exports = {};", loader: "js" }));
  },
};

const common = {
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify,
  sourcemap,
  legalComments: "linked",
  logLevel: "warning",
  define: { "process.env.NODE_ENV": '"production"' },
  plugins: [nodeStubPlugin, assetUrlPlugin],
};

fs.rmSync(outdir, { recursive: true, force: true });
fs.mkdirSync(outdir, { recursive: true });

await esbuild.build({
  ...common,
  entryPoints: { viewer: path.join(here, "src/viewer.js") },
  outdir,
});

// Workers are found while bundling (and may name further workers/assets): build until none is new.
const built = new Set();
for (;;) {
  const pending = [...workers].filter(([name]) => !built.has(name));
  if (!pending.length) break;
  for (const [name, abs] of pending) {
    built.add(name);
    await esbuild.build({
      ...common,
      entryPoints: { [name.replace(/\.m?js$/, "")]: abs },
      outdir,
    });
  }
}
for (const [name, abs] of assets) fs.copyFileSync(abs, path.join(outdir, name));

// The reading room's CJK font, self-hosted (no font CDN; a reader's machine may have no CJK
// font at all): Noto Sans SC 400 from @fontsource, its unicode-range subsets as woff2 only, so
// the browser fetches just the subsets the page's Chinese text needs. Served as
// fonts/noto-sans-sc.css next to viewer.js.
const fontPkg = path.dirname(fileURLToPath(import.meta.resolve("@fontsource/noto-sans-sc/400.css")));
const fontCss = fs
  .readFileSync(path.join(fontPkg, "400.css"), "utf8")
  .replace(/,\s*url\([^)]*\.woff\) format\('woff'\)/g, "");
const fontsOut = path.join(outdir, "fonts");
fs.mkdirSync(fontsOut);
for (const [, file] of fontCss.matchAll(/url\(\.\/files\/([^)]+\.woff2)\)/g)) {
  fs.copyFileSync(path.join(fontPkg, "files", file), path.join(fontsOut, file));
}
fs.writeFileSync(path.join(fontsOut, "noto-sans-sc.css"), fontCss.replaceAll("./files/", "./"));
fs.copyFileSync(path.join(fontPkg, "LICENSE"), path.join(fontsOut, "LICENSE.txt")); // SIL OFL 1.1

// No CDN, no remote code: the output must not name an external script/wasm host.
const CDN = /https?:\/\/(unpkg\.com|cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|esm\.sh|cdn\.skypack\.dev|ohif-assets|[a-z0-9.-]*\.cloudfront\.net)/i;
let total = 0;
const listing = [];
for (const file of fs.readdirSync(outdir).sort()) {
  const full = path.join(outdir, file);
  if (fs.statSync(full).isDirectory()) {
    const inside = fs.readdirSync(full).map((f) => fs.statSync(path.join(full, f)).size);
    const size = inside.reduce((a, b) => a + b, 0);
    total += size;
    listing.push(`${String(size).padStart(10)}  ${file}/ (${inside.length} files)`);
    continue;
  }
  const size = fs.statSync(full).size;
  total += size;
  listing.push(`${String(size).padStart(10)}  ${file}`);
  if (/\.js$/.test(file)) {
    const text = fs.readFileSync(full, "utf8");
    const m = text.match(CDN);
    if (m) throw new Error(`${file} names a CDN: ${m[0]}`);
  }
}
console.log(listing.join("\n"));
console.log(`${String(total).padStart(10)}  total (${(total / 1048576).toFixed(2)} MiB) in ${outdir}`);
