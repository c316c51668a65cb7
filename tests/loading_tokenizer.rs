//! CLIP tokenizer parity: ids for the 15 golden captions, built from `vocab.json` + `merges.txt`
//! (the SD 1.5 layout) and from a `tokenizers` JSON file, equal `golden/tokenizer.safetensors`.

use std::path::PathBuf;

use candle_core::{DType, Device};
use lora::models::tokenizer::{ClipTokenizer, ClipTokenizerSettings};

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn golden() -> (Vec<String>, Vec<Vec<u32>>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/tokenizer.json")).unwrap()).unwrap();
    let captions: Vec<String> =
        json["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    let tensors = candle_core::safetensors::load(fixtures().join("golden/tokenizer.safetensors"), &Device::Cpu).unwrap();
    let ids = tensors["input_ids"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let ids = ids.into_iter().map(|row| row.into_iter().map(|v| v as u32).collect()).collect();
    (captions, ids)
}

/// Token ids are integers: the tolerance is exact equality, caption by caption.
fn assert_matches_golden(tokenizer: &ClipTokenizer, route: &str) {
    let (captions, expected) = golden();
    assert_eq!(captions.len(), 15);
    assert_eq!(expected.len(), 15);
    for (caption, want) in captions.iter().zip(&expected) {
        let got = tokenizer.encode(caption).unwrap();
        assert_eq!(&got, want, "{route}: ids differ (exact match required) for caption {caption:?}");
    }
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let batch = tokenizer.encode_batch(&refs, &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[15, 77]);
    assert_eq!(batch.dtype(), DType::U32);
    let batch: Vec<Vec<u32>> = batch.to_vec2().unwrap();
    assert_eq!(batch, expected, "{route}: encode_batch differs from the golden ids (exact match required)");
}

#[test]
fn vocab_and_merges_folder_matches_golden_ids() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(tokenizer.pad_id(), 49407);
    assert_matches_golden(&tokenizer, "vocab.json + merges.txt");
}

#[test]
fn tokenizer_json_matches_golden_ids() {
    let tokenizer = ClipTokenizer::from_tokenizer_json(&fixtures().join("golden/clip-tokenizer.json")).unwrap();
    assert_matches_golden(&tokenizer, "tokenizer.json");
}

#[test]
fn folder_with_tokenizer_json_prefers_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("golden/clip-tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_matches_golden(&tokenizer, "folder with tokenizer.json");
}

#[test]
fn long_caption_is_truncated_with_eos_and_short_one_padded() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd/tokenizer")).unwrap();
    let long = "a very long caption ".repeat(40);
    let ids = tokenizer.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406, "BOS first");
    assert_eq!(ids[76], 49407, "EOS kept at the end after truncation");
    let empty = tokenizer.encode("").unwrap();
    assert_eq!(&empty[..2], &[49406, 49407]);
    assert!(empty[2..].iter().all(|&id| id == 49407), "padding with <|endoftext|>");
}

#[test]
fn pad_token_and_length_come_from_the_config_files() {
    // SD 2.x pads with "!" (id 0); a shorter max length must be honoured too.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd/tokenizer");
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("special_tokens_map.json"), r#"{"pad_token": "!"}"#).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": 16, "pad_token": {"content": "!"}}"#).unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.settings(), &ClipTokenizerSettings { pad_token: "!".into(), max_length: 16, ..Default::default() });
    let ids = tokenizer.encode("a red circle").unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!(ids[0], 49406);
    let eos = ids.iter().position(|&i| i == 49407).unwrap();
    assert!(ids[eos + 1..].iter().all(|&i| i == 0), "padded with id 0 ('!'): {ids:?}");
}

#[test]
fn missing_files_and_bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).err().expect("no merges.txt must fail").to_string();
    assert!(err.contains("merges.txt"), "{err}");

    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().expect("bad merges must fail"));
    assert!(err.contains("merges.txt line 2"), "{err}");

    std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().expect("bad vocab must fail"));
    assert!(err.contains("vocab.json"), "{err}");

    let err = format!("{:#}", ClipTokenizer::from_dir(&dir.path().join("nope")).err().unwrap());
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn tokenizer_json_without_special_tokens_is_refused() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/clip-tokenizer.json")).unwrap()).unwrap();
    json["post_processor"] = serde_json::Value::Null;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_tokenizer_json(&path).err().expect("no BOS/EOS must be refused"));
    assert!(err.contains("special tokens") && err.contains("tokenizer.json"), "{err}");

    std::fs::write(&path, "{ not json").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_tokenizer_json(&path).err().unwrap());
    assert!(err.contains("not a valid tokenizers JSON file"), "{err}");
}
