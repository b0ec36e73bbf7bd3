//! Aligned text tables for the operator commands, in the style operators
//! know from `cilium-dbg bpf … list`: uppercase headers, two-space gaps.

/// Renders rows under headers, each column as wide as its widest cell.
/// An empty table prints `empty` instead.
pub fn render(headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let rows = vec![
            vec!["a".to_string(), "1".to_string()],
            vec!["longer".to_string(), "22".to_string()],
        ];
        assert_eq!(
            render(&["NAME", "VALUE"], &rows, "none"),
            "NAME    VALUE\na       1\nlonger  22\n"
        );
    }

    #[test]
    fn empty_table() {
        assert_eq!(
            render(&["A"], &[], "No entries found."),
            "No entries found.\n"
        );
    }
}
