#!/usr/bin/python3
"""Writes a BMFont (text .fnt + one PNG page) of the characters of TEXT_FILE, drawn from FONT at
SIZE pixels in COLOR, so that jimp's print() can draw CJK text: jimp only draws bitmap fonts.
Usage: bmfont.py FONT SIZE RRGGBB TEXT_FILE OUT_DIR NAME   (Debian python3-pil)."""
import sys
from PIL import Image, ImageDraw, ImageFont

font_path, size, color, text_file, out_dir, name = sys.argv[1:7]
size = int(size)
rgb = tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))
font = ImageFont.truetype(font_path, size, index=0)
chars = sorted(set(open(text_file, encoding="utf-8").read()) - {"\n"} | {" ", "…"})
ascent, descent = font.getmetrics()
line = int(size * 1.25)
cell = size * 2
cols = 64
rows = (len(chars) + cols - 1) // cols
page = Image.new("RGBA", (cols * cell, rows * cell), (0, 0, 0, 0))
draw = ImageDraw.Draw(page)
lines = []
for i, ch in enumerate(chars):
    x0, y0 = (i % cols) * cell, (i // cols) * cell
    bbox = font.getbbox(ch)  # relative to the origin at the top of the ascent
    adv = round(font.getlength(ch))
    if ch == " " or bbox[2] <= bbox[0]:
        lines.append(f"char id={ord(ch)} x={x0} y={y0} width=0 height=0 xoffset=0 yoffset=0 xadvance={adv} page=0 chnl=15")
        continue
    draw.text((x0 - bbox[0], y0 - bbox[1]), ch, font=font, fill=rgb + (255,))
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    lines.append(f"char id={ord(ch)} x={x0} y={y0} width={w} height={h} xoffset={bbox[0]} yoffset={bbox[1] + (line - ascent - descent) // 2} xadvance={adv} page=0 chnl=15")
page.save(f"{out_dir}/{name}.png")
with open(f"{out_dir}/{name}.fnt", "w", encoding="utf-8") as f:
    f.write(f'info face="{name}" size={size} bold=0 italic=0 charset="" unicode=1 stretchH=100 smooth=1 aa=1 padding=0,0,0,0 spacing=0,0\n')
    f.write(f"common lineHeight={line} base={ascent} scaleW={page.width} scaleH={page.height} pages=1 packed=0\n")
    f.write(f'page id=0 file="{name}.png"\n')
    f.write(f"chars count={len(lines)}\n")
    f.write("\n".join(lines) + "\nkernings count=0\n")
