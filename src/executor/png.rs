//! PNG output with the recipe inside: a `parameters` text chunk in
//! AUTOMATIC1111's format, which its UI, ComfyUI and image browsers read.

/// The recipe of one image, as AUTOMATIC1111 writes it.
pub struct Recipe<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: u32,
    pub sampler: &'a str,
    pub guidance: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: &'a str,
    /// The short content hash (first 10 hex digits of sha256).
    pub model_hash: &'a str,
}

impl Recipe<'_> {
    pub fn to_text(&self) -> String {
        let mut s = String::from(self.prompt);
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            self.steps, self.sampler, self.guidance, self.seed, self.width, self.height, self.model_hash, self.model
        ));
        s
    }
}

/// Encodes RGB bytes as a PNG carrying `parameters` (tEXt when the text is
/// Latin-1, iTXt otherwise, as PIL does).
pub fn encode_rgb(rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
    }
    Ok(out)
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Option<String> {
    let reader = png::Decoder::new(png_bytes).read_info().ok()?;
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| info.utf8_text.iter().find(|t| t.keyword == "parameters").and_then(|t| t.get_text().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_round_trip_latin1_and_unicode() {
        for prompt in ["a red fox, café", "富士山 at dawn"] {
            let r = Recipe {
                prompt,
                negative_prompt: "blurry",
                steps: 20,
                sampler: "Euler a",
                guidance: 7.5,
                seed: 42,
                width: 16,
                height: 8,
                model: "tiny-sd",
                model_hash: "0123456789",
            };
            let png = encode_rgb(&[7u8; 16 * 8 * 3], 16, 8, &r.to_text()).unwrap();
            let text = read_parameters(&png).unwrap();
            assert_eq!(text, r.to_text());
            assert!(text.ends_with(
                "\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 16x8, Model hash: 0123456789, Model: tiny-sd"
            ));
            assert!(text.contains("\nNegative prompt: blurry\n"));
        }
    }
}
