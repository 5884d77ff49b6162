//! Aligned tables for humans: an upper-case header row, columns three spaces apart, no
//! trailing blanks, and `-` for an empty cell, so `awk '{print $2}'` still works.

/// A table being built row by row.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

const GAP: &str = "   ";

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .map(|c| cell(&c))
            .collect();
        cells.resize(self.headers.len(), "-".to_owned());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self, headers: bool) -> String {
        let rows: Vec<&Vec<String>> = headers
            .then_some(&self.headers)
            .into_iter()
            .chain(&self.rows)
            .collect();
        let mut widths = vec![0; self.headers.len()];
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(row.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in rows {
            let mut line = String::new();
            for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell's text: control characters escaped so that no value can break the layout, `-` when
/// empty.
fn cell(text: &str) -> String {
    if text.is_empty() {
        return "-".to_owned();
    }
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_blanks() {
        let mut t = Table::new(&["service", "instances", "route"]);
        t.row(vec!["emitter".into(), "2".into(), "1=90 2=10".into()]);
        t.row(vec!["a".into(), "10".into(), "".into()]);
        assert_eq!(
            t.render(true),
            "SERVICE   INSTANCES   ROUTE\n\
             emitter   2           1=90 2=10\n\
             a         10          -\n"
        );
        assert_eq!(
            t.render(false),
            "emitter   2    1=90 2=10\n\
             a         10   -\n"
        );
    }

    #[test]
    fn pads_short_rows_and_escapes_control_characters() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["x\ny".into()]);
        t.row(vec!["é".into(), "1".into(), "dropped".into()]);
        assert_eq!(t.render(true), "A      B\nx\\ny   -\né      1\n");
        assert!(!t.is_empty());
        assert!(Table::new(&["a"]).is_empty());
    }
}
