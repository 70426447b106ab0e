// The jimp side of bench/cards: the same 1080x608 card (background PNG, a title, a wrapped body,
// a footer) drawn with jimp's print() from BMFonts made by bmfont.py, N times; prints JSON.
// jimp's best settings: background decoded once and cloned per card, fonts loaded once, PNG
// deflate level 1 (the fastest, as outboxd's fdeflate fast mode).
import { Jimp, loadFont } from "jimp";
const [dir, n] = [process.argv[2], Number(process.argv[3] || 100)];
const vars = JSON.parse((await import("fs")).readFileSync(`${dir}/vars.json`, "utf8"));
const bg = await Jimp.read(process.argv[4]);
const title = await loadFont(`${dir}/title.fnt`);
const body = await loadFont(`${dir}/body.fnt`);
const foot = await loadFont(`${dir}/foot.fnt`);
let bytes = 0;
const card = async () => {
  const img = bg.clone();
  img.print({ font: title, x: 64, y: 56, text: vars.title, maxWidth: 952, maxHeight: 150 });
  img.print({ font: body, x: 64, y: 230, text: vars.body, maxWidth: 952, maxHeight: 300 });
  img.print({ font: foot, x: 64, y: 548, text: { text: vars.footer, alignmentX: 4 }, maxWidth: 952, maxHeight: 44 });
  const png = await img.getBuffer("image/png", { deflateLevel: 1 });
  bytes = png.length;
  return png;
};
(await import("fs")).writeFileSync(`${dir}/jimp.png`, await card());
const t0 = process.hrtime.bigint();
for (let i = 0; i < n; i++) await card();
const s = Number(process.hrtime.bigint() - t0) / 1e9;
console.log(JSON.stringify({ cards: n, seconds: s, cards_per_s: n / s, png_bytes: bytes }));
